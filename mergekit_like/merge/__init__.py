"""The merge pipeline: a recipe is validated, planned from the headers, then streamed by the engine.

``recipe`` (what to merge) -> ``parameters`` (values per tensor) -> ``plan``
(every decision, before any tensor is read) -> ``engine`` (read, compute, write,
overlapped; ``staging`` moves tensors to a GPU and back).
"""
