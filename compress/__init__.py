"""The methods: pure PyTorch, no Ray, no MLflow, no file formats."""
