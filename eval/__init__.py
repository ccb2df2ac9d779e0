"""The paper's evaluations (`osprey eval ...`): referring classification, open-vocabulary segmentation, region
captioning, LLM-judged descriptions and POPE, in-process or against a running server. See docs/eval.md."""
