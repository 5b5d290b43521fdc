"""The federation operator's console: server-rendered pages over the aggregator's reads (`app.py`)."""
