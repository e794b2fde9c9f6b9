"""Evaluation and data hygiene: Fréchet DoG distance, label agreement, contamination."""
