"""The installed releases against the package's ranges, checked when a tool starts (as run_clm.py's
``require_version``): a release outside them fails late, with a traceback (lm-eval before 0.4.10 in the zero-shot
evaluation), or at a flag it does not know (transformers before 5.23 at the launcher's --activation_checkpointing)."""

from importlib import metadata

from packaging.requirements import Requirement

from .errors import UserError

DISTRIBUTION = "dense-ft"


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
