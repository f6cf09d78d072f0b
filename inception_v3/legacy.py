"""BentoML's legacy IO descriptors, with the deprecation notices of its legacy API quieted.

BentoML 1.4 serves gRPC only for its legacy API (``bentoml.io`` descriptors,
``bentoml.legacy.Runner`` and ``Service``), which the service uses on purpose. BentoML
says each is deprecated in every API server at every start: a notice for this
project's maintainers that an operator can do nothing about. The filter goes in
after ``import bentoml`` (which puts its own, "default", in front of earlier ones)
and before ``bentoml.io`` is imported (it warns on import).
"""

from __future__ import annotations

import warnings

import bentoml  # noqa: F401  (see above)

DEPRECATION_NOTICES = r"`(bentoml\.io|Runner|bentoml\.legacy\.Service)` is deprecated since BentoML v1\.4"
warnings.filterwarnings("ignore", DEPRECATION_NOTICES, DeprecationWarning)
# protobuf's, about the generic services in the code BentoML generated for its gRPC API.
warnings.filterwarnings("ignore", r"google\.protobuf\.service module is deprecated", UserWarning)

from bentoml.io import JSON, Image  # noqa: E402

__all__ = ["JSON", "Image"]
