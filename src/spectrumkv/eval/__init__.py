"""Quality evaluations on real models and real text."""
