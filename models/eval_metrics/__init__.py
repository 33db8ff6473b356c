"""The registered evaluation metrics (models.metric_registry), one module per metric family.

Every module here registers its entries on import; models.metric_registry.registered() imports them
all. A new metric is a new module here with a `register(...)` call, plus its test.
"""
