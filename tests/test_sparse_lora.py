"""Sparse LoRA: masked adapters train, merge and reload without touching a pruned block."""

import copy
import dataclasses
import json
import re
import shutil

import pytest
import torch
import transformers
from conftest import file_contents, hub_cache, run_main, run_python, with_remote_code, without_tokenizer
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from test_masks import scatter_zeros
from test_sparse_trainer import token_dataset, training_args
from tiny_models import tiny_llama, zero_random_blocks
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer

from dense_ft import merge_lora, sparse_lora
from dense_ft.check_sparsity import main as check_sparsity_main
from dense_ft.errors import UserError
from dense_ft.masks import BlockMask, ElementMask, SparsityMasks
from dense_ft.sparse_lora import LLAMA_TARGET_MODULES, MaskedLoraLinear, add_sparse_lora, load_sparse_lora, lora_config
from dense_ft.sparse_trainer import SparseLoraTrainer
from dense_ft.sparsity import pin_standard_4bit_layout, prunable_linears, weight_values

INPUT = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def config(dropout=0.0, **overrides):
    # init_lora_weights=False: B is random too, so the update is non-zero before any training.
    settings = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(LLAMA_TARGET_MODULES),
                    init_lora_weights=False)
    settings.update(overrides)
    return LoraConfig(**settings)


def pruned_model(seed=0):
    model = tiny_llama(seed=seed)
    return model, zero_random_blocks(model)


def dense_masked_delta(lora_A, lora_B, scaling, pruned):
    """The masked update through plain autograd, with the mask as a full-size bool tensor."""
    return (lora_B @ lora_A) * scaling * ~pruned.dense().to(lora_A.device)


def dense_block_masked_update(x, lora_A, lora_B, scaling, pruned):
    return F.linear(x, dense_masked_delta(lora_A, lora_B, scaling, pruned))


def dense_element_masked_linear(x, weight, lora_A, lora_B, scaling, pruned):
    update = dense_masked_delta(lora_A, lora_B, scaling, pruned)
    return F.linear(x, update if weight is None else weight + update)


FOLDED = (sparse_lora.MaskedLoraFunction, "apply")
MASKED = {  # pruning, rank: the masks, and the function the layers compute the update with in training
    "blocks": (zero_random_blocks, 4, BlockMask, (sparse_lora, "block_masked_update"), dense_block_masked_update),
    "blocks, rank 256": (zero_random_blocks, 256, BlockMask, FOLDED, dense_element_masked_linear),
    "scattered": (lambda model: scatter_zeros(model, 0.3), 4, ElementMask, FOLDED, dense_element_masked_linear),
}


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def counted_calls(monkeypatch, owner, name: str, function=None) -> list:
    """``owner.name`` replaced by ``function`` (default: itself) for the test; the arguments of each call."""
    calls, function = [], function or getattr(owner, name)

    def counted(*args):
        calls.append(args)
        return function(*args)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("pruning", MASKED)
def test_gradients_equal_the_dense_masked_reference_and_skip_pruned_blocks(pruning, dropout, monkeypatch):
    prune, rank, mask_type, function, reference_function = MASKED[pruning]
    base = tiny_llama()
    prune(base)
    model = add_sparse_lora(base, config(dropout, r=rank)).train()
    assert all(isinstance(m.pruned, mask_type) for m in model.modules() if isinstance(m, MaskedLoraLinear))
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    loss = model(input_ids=INPUT, labels=INPUT).loss
    loss.backward()
    calls = counted_calls(monkeypatch, *function, reference_function)
    torch.manual_seed(0)
    expected_loss = reference(input_ids=INPUT, labels=INPUT).loss
    expected_loss.backward()
    assert len(calls) == 2 * 7, "the reference stands in for the path under test in every adapted layer"
    assert torch.allclose(loss, expected_loss, atol=1e-6)
    grads, expected = lora_grads(model), lora_grads(reference)
    assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-6, rtol=1e-4), name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_adapters_the_same_gradients(dropout, monkeypatch):
    # The launcher trains LoRA on GPUs with activation checkpointing: the update by blocks is recomputed in
    # backward, dropout's mask included, and the frozen base must still pass gradients down to the adapters.
    base = tiny_llama()
    zero_random_blocks(base)
    model = add_sparse_lora(base, config(dropout)).train()
    reference = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    calls = counted_calls(monkeypatch, sparse_lora, "block_masked_update")
    for run in (model, reference):
        torch.manual_seed(0)
        run(input_ids=INPUT, labels=INPUT).loss.backward()
    assert len(calls) == 3 * 14, "in the 14 layers: the checkpointed forward, its recomputation, the reference's"
    grads, expected = lora_grads(model), lora_grads(reference)
    assert grads.keys() == expected.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], atol=1e-7), name


@pytest.mark.parametrize("rank, dropout, by_blocks", [(85, 0.0, True), (86, 0.0, False), (255, 0.1, True),
                                                     (256, 0.1, False)])
def test_training_computes_a_block_masked_update_the_cheaper_way(rank, dropout, by_blocks, monkeypatch):
    # By blocks: 3 products of the 16x16 block grid, rank / 256 of the layer's matmul each; folded: the weight
    # gradient, one matmul, or three where dropout keeps the update out of the weight.
    base = tiny_llama()
    zero_random_blocks(base)
    model = add_sparse_lora(base, config(dropout, r=rank)).train()
    calls = counted_calls(monkeypatch, sparse_lora, "block_masked_update")
    model(input_ids=INPUT, labels=INPUT)
    assert len(calls) == (14 if by_blocks else 0)


def lora_update_and_grads(update, x, lora_A, lora_B):
    x, lora_A, lora_B = (t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B))
    output = update(x, lora_A, lora_B)
    output.float().square().sum().backward()
    return [t.detach().float().cpu() for t in (output, x.grad, lora_A.grad, lora_B.grad)]


def check_the_update_by_blocks(device: str, dtype: torch.dtype):
    """Sparse LoRA's training path on ``device`` (under autocast to ``dtype`` where it is not float32, as the
    Trainer runs bf16) against the masked update through plain autograd in float32."""
    generator = torch.Generator().manual_seed(0)
    mask = BlockMask(torch.rand(10, 6, generator=generator) < 0.3, 16).to(torch.device(device))
    x, lora_A, lora_B = (torch.randn(*shape, generator=generator).to(device)
                         for shape in [(3, 40, 96), (4, 96), (160, 4)])
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        by_blocks = lora_update_and_grads(lambda *t: sparse_lora.block_masked_update(*t, 2.0, mask), x, lora_A,
                                          lora_B)
    expected = lora_update_and_grads(lambda *t: dense_block_masked_update(*t, 2.0, mask), x, lora_A, lora_B)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # of the norm: bf16 keeps 8 bits of each product
    for name, got, want in zip(["update", "x.grad", "A.grad", "B.grad"], by_blocks, expected, strict=True):
        assert (got - want).norm() <= tolerance * want.norm(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_update_by_blocks_is_the_dense_masked_one(dtype):
    check_the_update_by_blocks("cpu", dtype)


def test_the_merge_keeps_every_pruned_weight_zero_and_the_same_function():
    base, pruned = pruned_model()
    model = add_sparse_lora(base, config()).eval()
    with torch.no_grad():
        unmerged = model(input_ids=INPUT).logits
    plain = get_peft_model(pruned_model()[0], config())  # the same adapter, as PEFT alone knows it
    set_peft_model_state_dict(plain, get_peft_model_state_dict(model))
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=INPUT).logits, unmerged, atol=1e-5)
    for name, linear in prunable_linears(merged).items():
        assert linear.weight[pruned[name]].eq(0).all(), name
        assert linear.weight[~pruned[name]].ne(0).float().mean() > 0.99

    dense_merge = plain.merge_and_unload()  # what PEFT's own merge does with the same adapter
    leaked = sum(int(linear.weight[pruned[name]].ne(0).sum())
                 for name, linear in prunable_linears(dense_merge).items())
    assert leaked > 0.9 * sum(int(p.sum()) for p in pruned.values())


@pytest.mark.parametrize("rank, dropout, compiled", [
    (4, 0.05, False), (96, 0.0, False),
    pytest.param(4, 0.05, True, marks=pytest.mark.slow),  # inductor compiles for 30-80 s on a CPU
], ids=["by blocks", "folded", "by blocks, torch.compile"])
def test_training_moves_only_the_adapters_and_the_merge_stays_sparse(tmp_path, rank, dropout, compiled):
    base, pruned = pruned_model()
    frozen = {name: p.detach().clone() for name, p in base.named_parameters()}
    model = add_sparse_lora(base, config(dropout, r=rank, init_lora_weights=True))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    Trainer(model=model, args=training_args(tmp_path, learning_rate=1e-2, torch_compile=compiled),
            train_dataset=token_dataset()).train()
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert all(not torch.equal(before[name], p) for name, p in trained.items()), "every adapter trains"
    merged = model.merge_and_unload()
    assert SparsityMasks(pruned_model()[0]).violations(merged) == {}
    changed = [name for name, p in merged.named_parameters() if not torch.equal(frozen[name], p)]
    assert changed and all(name.endswith("proj.weight") for name in changed)
    for name, linear in prunable_linears(merged).items():
        assert linear.weight[pruned[name]].eq(0).all(), name


def test_a_saved_adapter_reloads_masked(tmp_path):
    base, _ = pruned_model()
    model = add_sparse_lora(base, config()).eval()
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_sparse_lora(pruned_model()[0], str(tmp_path / "adapter")).eval()
    assert sum(isinstance(m, MaskedLoraLinear) and m.pruned is not None for m in reloaded.modules()) == 14
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=INPUT).logits, expected, atol=1e-6)


def test_all_linear_adapts_every_pruned_weight_as_peft_and_trl_take_it():
    model = add_sparse_lora(pruned_model()[0], lora_config(4, 8, 0.0, ["all-linear"]))
    adapted = [module for module in model.modules() if isinstance(module, MaskedLoraLinear)]
    assert len(adapted) == 14 and all(module.pruned is not None for module in adapted)  # lm_head left out


def test_adapter_layers_are_not_prunable_weights():
    model = add_sparse_lora(pruned_model()[0], config(init_lora_weights=True))  # B starts at exactly zero
    names = list(prunable_linears(model))
    assert len(names) == 14 and all(name.endswith("base_layer") for name in names)


def real_text_ids(tokenizer, corpus_dir, tokens=256):
    text = (corpus_dir / "wiki.test.raw").read_text(encoding="utf-8")[:20_000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def test_embedded_default_merge_equals_the_adapter_model_and_a_plain_merge_is_not_sparse(
        tmp_path, embedded_pruned, embedded_corpus_dir, tokenizer):
    pruned_dir = embedded_pruned / "pruned_model"
    ids = real_text_ids(tokenizer, embedded_corpus_dir)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(pruned_dir), config(r=8, lora_alpha=16))
    with torch.no_grad():  # an adapter trained elsewhere: small random updates on every target weight
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    plain.save_pretrained(tmp_path / "adapter")

    result = run_python("-m", "dense_ft.merge_lora", pruned_dir, tmp_path / "adapter", tmp_path / "merged", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["violations"] == 0 and 0.3 < report["fraction_of_norm_on_pruned_blocks"] < 0.6
    masks = SparsityMasks(AutoModelForCausalLM.from_pretrained(pruned_dir))
    assert report["pruned_weights_a_plain_merge_would_change"] == masks.num_pruned

    adapter_model = load_sparse_lora(AutoModelForCausalLM.from_pretrained(pruned_dir), str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        difference = (merged(input_ids=ids).logits - adapter_model.eval()(input_ids=ids).logits).abs().max().item()
    assert difference < 1e-4
    assert masks.violations(merged) == {}
    assert sum(masks.violations(plain.merge_and_unload()).values()) == masks.num_pruned


def test_bf16_training_and_merge_compute_the_same_function(tmp_path):
    base, pruned = pruned_model()
    model = add_sparse_lora(base.to(torch.bfloat16), config(init_lora_weights=True))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # PEFT keeps adapters fp32
    Trainer(model=model, args=training_args(tmp_path, bf16=True, learning_rate=1e-2),
            train_dataset=token_dataset()).train()
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=INPUT).logits
        merged = model.merge_and_unload()
        assert torch.equal(merged(input_ids=INPUT).logits, unmerged)  # the same bf16 weights, rounded once
    for name, linear in prunable_linears(merged).items():
        assert linear.weight.dtype == torch.bfloat16 and linear.weight[pruned[name]].eq(0).all(), name


@pytest.mark.parametrize("overrides, refusal", [
    (dict(use_dora=True), "plain LoRA adapters, not use_dora"),
    (dict(alora_invocation_tokens=[1]), "plain LoRA adapters, not alora_invocation_tokens"),
    (dict(lora_bias=True), "plain LoRA adapters, not lora_bias"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' rewrites the base weight"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora' rewrites the base weight"),
])
def test_lora_variants_a_bias_and_inits_that_rewrite_the_base_weight_are_refused(overrides, refusal):
    with pytest.raises(UserError, match=re.escape(refusal)):
        add_sparse_lora(pruned_model()[0], config(**overrides))


@dataclasses.dataclass
class UnmarkedLoraConfig(LoraConfig):
    """``use_dora`` as PEFT before 0.20 declares it: no ``is_lora_variant`` mark."""
    use_dora: bool = False


def test_a_peft_that_marks_no_lora_variant_is_refused_rather_than_trusted():
    """Otherwise DoRA would pass unseen (the marks are how the variants are found)."""
    with pytest.raises(UserError, match=re.escape("sparse LoRA needs peft >= 0.20")):
        add_sparse_lora(pruned_model()[0], UnmarkedLoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))


def test_pissa_would_fill_the_pruned_blocks_of_the_base_weight():
    """Why the refusal: PiSSA subtracts its first update from the base weight, pruned blocks included."""
    model, pruned = pruned_model()
    peft_model = get_peft_model(model, config(init_lora_weights="pissa"))
    base_weights = {name.removeprefix("base_model.model.").removesuffix(".base_layer"): linear.weight
                    for name, linear in prunable_linears(peft_model).items()}
    assert all(base_weights[name][positions].ne(0).any() for name, positions in pruned.items())


def adapter_with_a_trained_copy(pruned_dir, adapter_dir):
    """An adapter trained by plain PEFT: LoRA on v_proj, and a full copy of q_proj trained whole (pruned blocks
    included)."""
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(pruned_dir),
                           config(target_modules=["v_proj"], modules_to_save=["q_proj"]))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "modules_to_save" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p), alpha=1e-2)
    plain.save_pretrained(adapter_dir)
    return plain


def test_merging_a_modules_to_save_copy_of_a_pruned_weight_resets_its_pruned_blocks(tmp_path, tiny_pruned_dir,
                                                                                    capsys):
    plain = adapter_with_a_trained_copy(tiny_pruned_dir, tmp_path / "adapter")
    pruned = {name: linear.weight == 0
              for name, linear in prunable_linears(AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)).items()}

    with pytest.raises(SystemExit) as exit_status:
        merge_lora.main([str(tiny_pruned_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert exit_status.value.code == 0 and report["violations"] == 0
    adapted = [name for name in pruned if name.endswith(("q_proj", "v_proj"))]
    assert report["pruned_weights_a_plain_merge_would_change"] == sum(int(pruned[name].sum()) for name in adapted)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    trained_copy = plain.base_model.model.model.layers[0].self_attn.q_proj.modules_to_save["default"].weight
    q_proj, kept = merged.model.layers[0].self_attn.q_proj.weight, ~pruned["model.layers.0.self_attn.q_proj"]
    assert q_proj[~kept].eq(0).all() and torch.equal(q_proj[kept], trained_copy[kept])


def test_merge_lora_and_check_sparsity_fetch_from_the_hub_into_cache_dir(tmp_path, tiny_pruned_dir):
    """The Hub here: its cache, read offline, with the pruned model and an adapter trained on it."""
    adapter_with_a_trained_copy(tiny_pruned_dir, tmp_path / "adapter")
    cache = tmp_path / "cache"
    hub_cache(cache, "acme/tiny-pruned", {"main": tiny_pruned_dir})
    hub_cache(cache, "acme/tiny-lora", {"main": tmp_path / "adapter"})
    merged = run_main(merge_lora.main, "acme/tiny-pruned", "acme/tiny-lora", tmp_path / "merged", "--cache_dir", cache,
                      "--json")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads(merged.stdout)["pruned_weights_a_plain_merge_would_change"] > 0
    checked = run_main(check_sparsity_main, tmp_path / "merged", "--reference", "acme/tiny-pruned",
                       "--cache_dir", cache, "--json")
    assert checked.returncode == 0 and json.loads(checked.stdout)["violations"] == 0, checked.stderr[-3000:]


def test_merge_lora_saves_the_tokenizer_named_for_a_pruned_model_saved_without_one(tmp_path, tiny_pruned_dir,
                                                                                    tokenizer):
    adapter_with_a_trained_copy(tiny_pruned_dir, tmp_path / "adapter")
    bare = without_tokenizer(tiny_pruned_dir, tmp_path / "bare")
    missing = run_main(merge_lora.main, bare, tmp_path / "adapter", tmp_path / "merged")
    assert missing.returncode == 2 and "error: cannot load a tokenizer from" in missing.stderr
    assert not (tmp_path / "merged").exists()
    merged = run_main(merge_lora.main, bare, tmp_path / "adapter", tmp_path / "merged", "--tokenizer_name",
                      tiny_pruned_dir, "--json")
    assert merged.returncode == 0 and json.loads(merged.stdout)["violations"] == 0, merged.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").get_vocab() == tokenizer.get_vocab()


def test_merge_lora_runs_the_code_of_a_pruned_model_that_has_its_own_only_when_trusted(tmp_path, tiny_pruned_dir):
    adapter_with_a_trained_copy(tiny_pruned_dir, tmp_path / "adapter")
    pruned = with_remote_code(tiny_pruned_dir, tmp_path / "pruned")
    refused = run_main(merge_lora.main, pruned, tmp_path / "adapter", tmp_path / "merged")
    assert refused.returncode == 2 and "holds its own code, which runs only with --trust_remote_code" in refused.stderr
    merged = run_main(merge_lora.main, pruned, tmp_path / "adapter", tmp_path / "merged", "--trust_remote_code",
                      "--json")
    assert merged.returncode == 0 and json.loads(merged.stdout)["violations"] == 0, merged.stderr[-3000:]
    assert (tmp_path / "merged" / "modeling_tiny.py").is_file()


def test_a_modules_to_save_copy_of_a_pruned_weight_loads_masked_and_merges_sparse(tmp_path, tiny_pruned_dir):
    adapter_with_a_trained_copy(tiny_pruned_dir, tmp_path / "adapter")
    masks = SparsityMasks(AutoModelForCausalLM.from_pretrained(tiny_pruned_dir))
    loaded = load_sparse_lora(AutoModelForCausalLM.from_pretrained(tiny_pruned_dir), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits = loaded(input_ids=INPUT).logits
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(input_ids=INPUT).logits, logits, atol=1e-5)  # what was evaluated is what merged
    assert masks.violations(merged) == {}
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight,  # the copy's kept weights as trained
                           masks.linears["model.layers.0.self_attn.q_proj"].weight)


def test_sparse_lora_trainer_masks_a_modules_to_save_copy_every_step_and_saves_a_sparse_merge(tmp_path, tiny_pruned_dir,
                                                                                               tokenizer):
    reference = SparsityMasks(AutoModelForCausalLM.from_pretrained(tiny_pruned_dir))
    adapted = add_sparse_lora(AutoModelForCausalLM.from_pretrained(tiny_pruned_dir),
                              config(target_modules=["v_proj"], modules_to_save=["o_proj"]))
    trainer = SparseLoraTrainer(model=adapted, args=training_args(tmp_path / "out"), train_dataset=token_dataset(),
                                processing_class=tokenizer)
    trainer.train()
    trainer.save_merged_model()
    trainer.save_model()  # as the Trainer's push_to_hub() does: the adapter must not land beside the merged model
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reference.violations(merged) == {}
    o_proj = "model.layers.0.self_attn.o_proj"
    assert not torch.equal(merged.get_submodule(o_proj).weight, reference.linears[o_proj].weight), "the copy trained"


@pytest.mark.parametrize("case, refusal", [
    ("output is a file", "output_dir {output} is a file"),
    ("output is the pruned model", "output_dir {output} is the pruned_model directory, which the run would "
                                   "overwrite"),
    ("output is the adapter", "output_dir {output} is the adapter directory"),
    ("the pruned model is an adapter", "{pruned} is a PEFT adapter directory, not a model: merge it"),
])
def test_merge_paths_that_would_lose_a_file_or_mean_another_thing_are_refused_before_any_work(
        case, refusal, tmp_path, tiny_pruned_dir, capsys):
    pruned, adapter, output = tmp_path / "pruned", tmp_path / "adapter", tmp_path / "merged"
    shutil.copytree(tiny_pruned_dir, pruned)
    get_peft_model(AutoModelForCausalLM.from_pretrained(pruned), config()).save_pretrained(adapter)
    if case == "output is a file":
        output.write_text("notes")
    output = {"output is the pruned model": pruned, "output is the adapter": adapter}.get(case, output)
    if case == "the pruned model is an adapter":
        pruned = adapter
    saved = file_contents(tmp_path)
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_status:
        merge_lora.main([str(pruned), str(adapter), str(output)])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {refusal.format(output=output, pruned=pruned)}")
    assert file_contents(tmp_path) == saved


@pytest.mark.parametrize("config_class, width, refusal", [
    ("LlamaConfig", 128, "size mismatch for base_model.model.model.layers."),
    ("Phi3Config", 64, "20 of its weights are for modules this model lacks (model.layers.0.mlp.gate_proj, ...)"),
], ids=["wider", "fused projections"])
def test_an_adapter_of_another_model_is_refused_not_merged_in_part(config_class, width, refusal, tmp_path, tokenizer,
                                                                    capsys):
    adapter, other_pruned = tmp_path / "adapter", tmp_path / "other_pruned"
    get_peft_model(pruned_model()[0], config()).save_pretrained(adapter)
    other = AutoModelForCausalLM.from_config(getattr(transformers, config_class)(
        vocab_size=256, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2))
    zero_random_blocks(other)
    other.save_pretrained(other_pruned)
    tokenizer.save_pretrained(other_pruned)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        merge_lora.main([str(other_pruned), str(adapter), str(tmp_path / "merged")])
    assert exit_status.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {adapter} was trained on another model (") and refusal in last_line
    assert not (tmp_path / "merged").exists()


def load_in_4bit(model_dir, nested=False):
    return AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=nested))


@pytest.mark.parametrize("rank", [4, 256])  # trained by blocks; folded (the update in a matmul of its own)
def test_qlora_on_the_4bit_pruned_model_trains_masked_and_merges_sparse_into_the_unquantized_one(tmp_path,
                                                                                                tiny_pruned_dir, rank,
                                                                                                monkeypatch):
    unquantized = AutoModelForCausalLM.from_pretrained(tiny_pruned_dir)
    reference = SparsityMasks(unquantized)
    model = add_sparse_lora(load_in_4bit(tiny_pruned_dir), lora_config(rank, 2 * rank, 0.0, ["all-linear"]))
    masks = SparsityMasks(model)  # read through the 4-bit codes, which keep the pruned zeros
    assert masks.violations() == {} and all(torch.equal(masks.masks[f"base_model.model.{name}.base_layer"].dense(),
                                                        mask.dense()) for name, mask in reference.masks.items())
    by_blocks = counted_calls(monkeypatch, sparse_lora, "block_masked_update")
    SparseLoraTrainer(model=model, args=training_args(tmp_path / "run"), train_dataset=token_dataset()).train()
    assert bool(by_blocks) == (rank == 4)
    assert merge_lora.update_on_pruned_blocks(model, masks)["pruned_weights_a_plain_merge_would_change"] > 0

    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    update = q_proj.get_delta_weight("default")  # s * B @ A, masked
    torch.testing.assert_close(q_proj(x), q_proj.base_layer(x) + x @ update.T)  # the 4-bit base's own kernel
    with pytest.raises(UserError, match="merges into the pruned model unquantized"):
        model.merge_and_unload()

    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_sparse_lora(load_in_4bit(tiny_pruned_dir), tmp_path / "adapter")  # to train on, or evaluate
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(INPUT).logits, model.eval()(INPUT).logits)
    assert masks.violations() == {} and SparsityMasks(reloaded).violations() == {}
    plain = get_peft_model(copy.deepcopy(unquantized), model.peft_config["default"])
    set_peft_model_state_dict(plain, get_peft_model_state_dict(model))
    assert reference.violations(plain.merge_and_unload())  # PEFT's own merge fills the pruned blocks
    merged = merge_lora.merge(str(tiny_pruned_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert merged["violations"] == 0
    assert reference.violations(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) == {}


def test_a_4bit_model_without_a_pattern_keeps_its_zero_blocks_and_refuses_scattered_zeros(tmp_path,
                                                                                          tiny_pruned_dir):
    # nf4 rounds small weights to zero (8% of the tiny model's kept weights): whole zero blocks are still
    # pruning, scattered zeros can no longer be told from the codes'.
    unpatterned = tmp_path / "unpatterned"
    shutil.copytree(tiny_pruned_dir, unpatterned)
    config_file = unpatterned / "config.json"
    config_file.write_text(json.dumps({key: value for key, value in json.loads(config_file.read_text()).items()
                                       if key != "sparsity_pattern"}))
    unquantized = SparsityMasks(AutoModelForCausalLM.from_pretrained(unpatterned))
    quantized = SparsityMasks(load_in_4bit(unpatterned))
    assert quantized.source == unquantized.source == "zeros" and quantized.masks.keys() == unquantized.masks.keys()
    assert all(torch.equal(quantized.masks[name].dense(), mask.dense()) for name, mask in unquantized.masks.items())

    tiny_llama().save_pretrained(tmp_path / "dense")  # no exact zero unquantized
    assert SparsityMasks(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")).source == "none"
    with pytest.raises(UserError, match="in 4-bit cannot be told from the zeros its codes make of small weights"):
        SparsityMasks(load_in_4bit(tmp_path / "dense"))


def is_repacked(linear) -> bool:
    return getattr(linear.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("nested", [False, True], ids=["scales", "nested scales"])
def test_4bit_weights_repacked_for_cpu_inference_read_right_and_are_pinned_back_to_the_standard_layout(
        tiny_pruned_dir, nested):
    model = load_in_4bit(tiny_pruned_dir, nested)
    linears = prunable_linears(model).values()
    values = [weight_values(linear.weight).clone() for linear in linears]
    with torch.no_grad():
        model.eval()(INPUT)  # on a CPU with AVX512-BF16, bitsandbytes repacks every 4-bit weight in place
    if not any(map(is_repacked, linears)):
        pytest.skip("bitsandbytes did not repack the 4-bit weights (it does from 0.49, on a CPU with AVX512-BF16)")

    def assert_values_kept():  # up to the repacked scales' bf16 rounding
        for linear, value in zip(linears, values, strict=True):
            torch.testing.assert_close(weight_values(linear.weight), value, rtol=0, atol=1e-3)

    assert_values_kept()
    assert SparsityMasks(model).violations() == {}
    pin_standard_4bit_layout(model)
    model.state_dict()  # a checkpoint save: bitsandbytes' own unpacking would leave the scales in the wrong order
    assert not any(map(is_repacked, linears))
    assert_values_kept()
    with torch.no_grad():
        model.eval()(INPUT)
    assert not any(map(is_repacked, linears))  # pinned: not repacked again
    assert_values_kept()
