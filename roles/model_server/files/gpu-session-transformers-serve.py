"""`transformers serve` for one model, behind the session's API key.

transformers serve has no authentication of its own (huggingface/transformers#39367), so this adds
it the way vLLM's --api-key works: every route but /health wants `Authorization: Bearer <key>`.
The key comes from GPU_SESSION_API_KEY in the environment and is removed from it at once. All
arguments are transformers serve's own.
"""

from __future__ import annotations

import hmac
import os
import sys

from fastapi.responses import JSONResponse
from transformers.cli.serving import server

KEY = os.environ.pop("GPU_SESSION_API_KEY", "").encode()
if len(KEY) < 32:
    sys.exit("GPU_SESSION_API_KEY is missing or shorter than 32 characters: the server will not start without it.")

_build_server = server.build_server


def build_server_with_key(*args, **kwargs):
    app = _build_server(*args, **kwargs)

    @app.middleware("http")
    async def require_key(request, call_next):
        if request.url.path != "/health":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, KEY):
                return JSONResponse({"error": {"message": "Invalid API key", "type": "invalid_request_error"}}, status_code=401)
        return await call_next(request)

    return app


server.build_server = build_server_with_key  # Serve imports it when it starts

if __name__ == "__main__":
    from transformers.cli.transformers import app

    sys.argv = ["transformers", "serve", *sys.argv[1:]]
    app()  # not transformers' main(): that checks PyPI for a newer release first
