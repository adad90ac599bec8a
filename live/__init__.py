"""tierlab's live serving stack (gateway, node agents, registry, engines, loader).

Not built yet: it is the next milestone (the live-mode issue). It will import `core`
only, never `sim`, and write the same record schema (`core.records`).
"""
