"""Serving: an OpenAI-compatible server with separate reasoning (`r1kit serve`), a web chat and a
terminal chat (`r1kit chat`).

    text.py       token stream → reasoning / content, stop strings, incremental decoding
    backends.py   r1kit engine (continuous batching) or llama.cpp (.gguf) behind one interface
    scheduler.py  the background task that batches concurrent requests
    protocol.py   request validation, OpenAI error objects, response bodies
    server.py     FastAPI app and `r1kit serve`;  chat.py: `r1kit chat`;  static/index.html: web chat
    testing.py    a tiny trained reasoning model and an in-thread server, for tests and benchmarks
"""
