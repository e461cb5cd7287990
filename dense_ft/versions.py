"""The installed releases against the package's ranges, checked when a tool starts (as run_clm.py's
``require_version``): a release outside them fails late, with a traceback (lm-eval before 0.4.10 in the zero-shot
evaluation), or at a flag it does not know (transformers before 5.23 at the launcher's --activation_checkpointing).
Likewise an optional package's release that cannot do what a flag asks of it (bitsandbytes' optimizers on the CPU
before 0.50), checked once the flags are read."""

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from .errors import UserError

DISTRIBUTION = "dense-ft"
BITSANDBYTES_STEPS_ON_CPU = Version("0.50")  # the first release whose optimizers step on the CPU


def installed_requirements() -> list[str]:
    """The package's own requirements as installed (pyproject.toml's, not a copy); none when it is not installed."""
    try:
        return metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []


def check_installed_versions(requirements: list[str] | None = None) -> None:
    """Refuse, in one line, a missing dependency or one whose release is out of range (extras are not checked)."""
    requirements = installed_requirements() if requirements is None else requirements
    for requirement in map(Requirement, requirements):
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        wanted = f"{requirement.name}{requirement.specifier}"
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise UserError(f"{requirement.name} is not installed: pip install '{wanted}'") from None
        if not requirement.specifier.contains(found, prereleases=True):
            raise UserError(f"{requirement.name} {found} is installed, but {DISTRIBUTION} needs {wanted}: "
                            f"pip install '{wanted}'")


def check_optimizer_steps_on(device_type: str, optimizer_cls: type, optim: str, release: str | None = None) -> None:
    """Refuse a bitsandbytes optimizer (GaLore's 8-bit one too) on the CPU with a release before 0.50, whose first
    step fails there with a traceback. ``release``: bitsandbytes', the installed one by default."""
    optimizers = sys.modules.get("bitsandbytes.optim.optimizer")  # imported with the optimizer, if it is one
    if device_type != "cpu" or optimizers is None or not issubclass(optimizer_cls, optimizers.Optimizer8bit):
        return
    found = release or metadata.version("bitsandbytes")
    if Version(found) < BITSANDBYTES_STEPS_ON_CPU:
        raise UserError(f"--optim {optim} on the CPU needs bitsandbytes >= {BITSANDBYTES_STEPS_ON_CPU} ({found} is "
                        f"installed): pip install 'bitsandbytes>={BITSANDBYTES_STEPS_ON_CPU}', or train on a GPU")
