"""The edge service on the thin runtime (`enginekit serve`), and the example of embedding it.

Serving a bundle is three steps, each usable alone in your own service:

    from runtimes.serve import Metrics, ServeConfig, create_app, load_models

    config = ServeConfig(max_batch=16, max_delay_ms=2)        # batch up to 16 rows, wait <= 2 ms
    metrics = Metrics()                                       # Prometheus registry of its own
    models = load_models(["engines/bert-ort-fp32"], config, metrics)   # runtimes.load + a batcher each
    app = create_app(models, metrics, config)                 # Starlette ASGI app
    # then: uvicorn.run(app, host="127.0.0.1", port=8000), or mount `app` in a larger ASGI app

or, without HTTP, the batcher over any runner (batching.py; numpy + asyncio):

    batcher = DynamicBatcher(runner.infer, max_batch=16, max_delay_s=0.002)
    batcher.start()                                           # in a running event loop
    outputs = await batcher.submit(runner.validate(feeds))    # from many tasks at once

Like the rest of `runtimes`, this package never imports torch, transformers or the build side;
starlette, uvicorn and prometheus-client come with `pip install 'enginekit[serve]'`.
"""

from __future__ import annotations

from .app import Metrics, ModelService, ServeConfig, batch_dim, create_app, load_models, run_server
from .batching import DynamicBatcher, Overloaded
from .codec import RequestError

__all__ = ["DynamicBatcher", "Metrics", "ModelService", "Overloaded", "RequestError", "ServeConfig", "batch_dim",
           "create_app", "load_models", "run_server"]
