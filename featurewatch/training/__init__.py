"""Training SAEs on a model's activations: harvest, train, evaluate."""
