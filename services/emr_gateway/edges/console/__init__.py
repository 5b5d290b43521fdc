"""The hospital console: server-rendered pages over the gateway's use cases (`app.py`)."""
