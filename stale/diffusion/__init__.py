"""The objective and samplers: pure functions and small classes, apart from the model and from Lightning."""
