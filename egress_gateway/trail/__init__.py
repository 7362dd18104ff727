"""The offline audit-trail tools behind `egress-gateway audit`: reading the JSON-lines trail (`read.py`), rendering
it (`render.py`), suggesting a policy from it (`suggest.py`) and replaying it against policies (`replay.py`).

Never imported by the data path: the hot-path recorder lives in `audit/`, and these tools import only its attribute
vocabulary (`audit/fields.py`).
"""
