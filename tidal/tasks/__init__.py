"""Built-in tasks (arithmetic) and the offline builders of the models that learn them."""

from tidal.tasks.prepare import prepare_model

__all__ = ["prepare_model"]
