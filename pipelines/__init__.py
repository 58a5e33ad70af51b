"""DVC stage scripts: each validates params.yaml, calls ballot.*, and replaces its outputs only on success."""
