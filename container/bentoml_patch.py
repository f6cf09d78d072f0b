"""The fix for BentoML issue 5566 in BentoML 1.4.39: ``bentoml containerize`` with a Dockerfile template.

    python -m container.bentoml_patch          # `make setup` runs it; idempotent

BentoML 1.4.36 made ``resolve_user_filepath`` (bentoml/_internal/utils/filesystem.py)
refuse by default any file outside the current directory (BentoML pull request 5548).
``bentoml containerize`` copies the Bento into a temporary directory and resolves the
Bento's own copy of the template, ``env/docker/Dockerfile.template``, there, with that
check (``generate_containerfile`` in bentoml/_internal/container/generate.py). So it
fails from every directory that is not an ancestor of the temporary one, the project
folder included: "Accessing file outside of current working directory is not allowed:
/tmp/.../env/docker/Dockerfile.template". 1.4.39, pinned here, still has the bug.

The fix is the one proposed upstream (BentoML pull request 5596): that call resolves
the template with ``secure=False``. The path it resolves is BentoML's own, inside its
temporary copy of the Bento. ``bentoml build`` still resolves the bentofile's
``dockerfile_template`` with the check (build_config.py) before it copies the template
into the Bento, so no path from a user skips it.

Only BentoML 1.4.39 is patched: another version is left as it is, and
tests/test_containerfile.py, which generates the Dockerfile the way ``bentoml
containerize`` does, fails where the bug is still there.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

PATCHED_VERSION = "1.4.39"
MODULE = "bentoml/_internal/container/generate.py"
ORIGINAL = "resolve_user_filepath(user_templates, build_ctx)"
PATCHED = "resolve_user_filepath(user_templates, build_ctx, secure=False)"
UNPATCHED_ERROR = (
    "error: this environment's BentoML lacks the fix for BentoML issue 5566 (`bentoml containerize` "
    "refuses the Bento's Dockerfile template): run `make setup` or `python -m container.bentoml_patch`"
)


def generate_module() -> Path:
    return Path(str(importlib.metadata.distribution("bentoml").locate_file(MODULE)))


def fix_missing() -> bool:
    """True where this environment's BentoML is 1.4.39 without the fix."""
    return importlib.metadata.version("bentoml") == PATCHED_VERSION and PATCHED not in generate_module().read_text()


def apply() -> str:
    """Patches the installed BentoML in place; returns what it did, in one line."""
    version = importlib.metadata.version("bentoml")
    if version != PATCHED_VERSION:
        return f"BentoML {version} left unpatched: the fix for issue 5566 is written for {PATCHED_VERSION}"
    module = generate_module()
    source = module.read_text()
    if PATCHED in source:
        return f"BentoML {version}: the fix for issue 5566 is in place ({module})"
    if source.count(ORIGINAL) != 1:
        raise SystemExit(f"error: {module} is not BentoML {version}'s: `{ORIGINAL}` not found once")
    patched = source.replace(ORIGINAL, PATCHED)
    compile(patched, str(module), "exec")
    module.write_text(patched)
    return f"BentoML {version}: fixed issue 5566 in {module}"


if __name__ == "__main__":
    print(apply())
