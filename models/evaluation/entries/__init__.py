"""The registered evaluation metrics (models.evaluation.registry), one module per metric family.

Every module here registers its entries on import; models.evaluation.registry.registered() imports them
all. A new metric is a new module here with a `register(...)` call, plus its test.
"""
