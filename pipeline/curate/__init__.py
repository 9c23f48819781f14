"""From outputs to a training set: the paper's evaluation as a command (`evaluate`, `features`,
`plot`) and a curated WebDataset of the rows that pass a filter (`select`, `curated`), over an
output's manifests joined with its score sidecars (`table`). Beside the driver and the tools;
commands in `cli`."""
