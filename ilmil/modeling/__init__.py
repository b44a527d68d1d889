from .expansion import expand_predictor_state_dict, load_expanded

__all__ = ["expand_predictor_state_dict", "load_expanded"]
