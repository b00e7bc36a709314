"""unmix evaluation: linear evaluation, kNN, and MLflow comparison of runs."""
