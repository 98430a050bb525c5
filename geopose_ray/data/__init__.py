"""Data layer: the challenge file layout, manifests and folds, validation, the training cache, synthesis."""
