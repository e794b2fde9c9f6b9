"""The Lightning system: the only place where model, objective, optimiser and sampling meet."""
