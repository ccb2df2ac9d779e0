"""One module per evaluation command: load items, ask the model, score, write JSON + Markdown report."""
