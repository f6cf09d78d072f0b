"""Make BentoML's HTTP server require client certificates when told to (a patch of BentoML 1.4.39).

``bentoml_cli.worker.http_api_server`` hands ``api_server.ssl.cert_reqs`` to uvicorn
only when it is unset (as ``CERT_NONE``): a configured ``cert_reqs: 2``
(``ssl.CERT_REQUIRED``) never reached uvicorn, so mutual TLS held on the gRPC door
but any client without a certificate got through on HTTP. The worker loads the
service before it builds its ``uvicorn.Config``, so the value is put back there.
``tests/test_tls.py`` checks that HTTP refuses a client without a certificate, and
fails if this stops taking effect.
"""

from __future__ import annotations

import functools
import typing as t

import uvicorn
from bentoml._internal.configuration.containers import BentoMLContainer


def install() -> None:
    create = uvicorn.Config.__init__
    if getattr(create, "keeps_cert_reqs", False):
        return

    @functools.wraps(create)
    def init(config: uvicorn.Config, app: t.Any, **options: t.Any) -> None:
        cert_reqs = BentoMLContainer.ssl.cert_reqs.get()
        if options.get("ssl_certfile") and cert_reqs is not None:
            options["ssl_cert_reqs"] = cert_reqs
        create(config, app, **options)

    init.keeps_cert_reqs = True  # type: ignore[attr-defined]
    uvicorn.Config.__init__ = init
