"""An OpenAI-compatible HTTP server for Grok-1 on top of the engine (`python -m grok1.serve`).

    python -m grok1.serve --checkpoint checkpoints --mesh data=1,model=8

`cli` starts it (flags, loading, warm-up, multi-host roles), `app` holds the routes,
`completions` and `chat` the two generation endpoints, `generation` what they share, `bridge`
the hand-over of engine events to asyncio, `protocol` the request bodies and errors, `metrics`
the Prometheus metrics. See docs/serving.md.
"""
