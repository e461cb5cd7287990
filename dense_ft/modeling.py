"""Loading and saving models and tokenizers, from local directories or the Hub."""

import os

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from .errors import UserError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ``from_pretrained``'s arguments that the tokenizer takes as its model does: where the files come from, and whether
# the code among them may run.
SHARED_WITH_TOKENIZER = ("cache_dir", "revision", "token", "trust_remote_code")
# What transformers says of a model type it does not know.
UNKNOWN_ARCHITECTURE = "does not recognize this architecture"


def looks_like_local_path(name: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_source(name: str) -> None:
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "adapter_config.json")):  # transformers would load it as plain LoRA
            raise UserError(f"{name} is a PEFT adapter directory, not a model: merge it into the pruned model it was "
                            "trained on (python -m dense_ft.merge_lora) and give the merged model")
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{name} is not a model directory (no config.json)")
    check_local_source(name, "model")


def check_local_source(name: str, kind: str) -> None:
    if not os.path.isdir(name) and looks_like_local_path(name):
        raise UserError(f"{kind} directory not found: {name}")


def _from_pretrained(auto_class, name: str, **kwargs):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as error:
        raise UserError(f"cannot load model {name!r}: {first_line(error)}") from error
    except SafetensorError as error:
        raise UserError(f"cannot load model {name!r}: a weights file is truncated or corrupted "
                        f"({first_line(error)})") from error
    except ValueError as error:
        if needs_remote_code(error):
            raise remote_code_refused(name) from error
        if UNKNOWN_ARCHITECTURE in str(error):  # a model newer than this transformers
            raise UserError(f"cannot load model {name!r}: {first_line(error).split('. ')[0]} (transformers "
                            f"{transformers.__version__}): pip install --upgrade transformers") from error
        raise


def needs_remote_code(error: ValueError) -> bool:
    """transformers' refusal to run the code that a model or tokenizer comes with, unless trusted."""
    return "trust_remote_code" in str(error)


def remote_code_refused(name: str) -> UserError:
    return UserError(f"{name} holds its own code, which runs only with --trust_remote_code: read it, then pass that "
                     "flag")


def load_weights(name: str, dtype: str = "float32", **kwargs):
    """A causal LM alone (``kwargs`` go to ``from_pretrained``); errors (missing path, unreachable Hub) are one
    line."""
    check_model_source(name)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return _from_pretrained(AutoModelForCausalLM, name, dtype=DTYPES[dtype], **kwargs)


def load_model(name: str, dtype: str = "float32", device: str | None = None, tokenizer_name: str | None = None,
               **kwargs):
    """A causal LM and its tokenizer, both as ``kwargs``' ``SHARED_WITH_TOKENIZER`` say; the tokenizer from
    ``tokenizer_name`` instead if given (at its own default revision)."""
    model = load_weights(name, dtype, **kwargs)
    options = {key: kwargs[key] for key in SHARED_WITH_TOKENIZER if key in kwargs}
    if tokenizer_name:
        check_local_source(tokenizer_name, "tokenizer")
        options.pop("revision", None)
    tokenizer = load_tokenizer(tokenizer_name or name, **options)
    if device:
        model.to(device)
    return model, tokenizer


def load_tokenizer(name: str, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:  # ValueError: a directory without the files of any tokenizer
        if isinstance(error, ValueError) and needs_remote_code(error):
            raise remote_code_refused(name) from error
        raise UserError(f"cannot load a tokenizer from {name!r}: {first_line(error).rstrip(' :')}") from error


def check_vocabulary(model, tokenizer, source: str) -> None:
    """For a model that will read text: a token id beyond its embeddings would fail there, as an indexing error."""
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise UserError(f"the tokenizer of {source} has {len(tokenizer)} tokens, more than the model's {embeddings} "
                        "embeddings: give the tokenizer the model was trained with")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def save_model(model, tokenizer, directory: str) -> None:
    """A normal HF directory: safetensors, config, generation config, tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
