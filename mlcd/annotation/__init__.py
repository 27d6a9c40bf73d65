"""Entity annotation for MOFI (python -m mlcd.annotate): matching, selection, the label store.

matcher.py    normalised, whole-word, leftmost-longest phrase matching (PhraseMatcher)
selection.py  teacher filter, top-k, rare entities -> label rows
pipeline.py   the resumable stages: candidates, entity-text embeddings, teacher scores
outputs.py    label files, entities.json, quality against ground truth, the plot
store.py      the output directory's layout and its reader, load_annotations
"""
