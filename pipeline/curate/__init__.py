"""From outputs to a training set: the paper's evaluation as a command and a curated WebDataset
of the rows that pass a filter, over an output's manifests joined with its score sidecars."""
