"""Does a model read the word of a yes/no question? Asks "Is there a {shape} in <region>?" for all ten shapes about
each single-shape region of the first 12 test records. Run: python shape_yes_probe.py MODEL DATA"""
import collections
import json
import sys
from pathlib import Path

from data_tools.synth.vocab import SHAPES
from osprey.data.records import parse_record, record_masks
from osprey.inference import OspreyPipeline, SamplingParams

data = Path(sys.argv[2] if len(sys.argv) > 2 else 'data/synth')
pipe = OspreyPipeline.from_pretrained(sys.argv[1], device='cpu')
params = SamplingParams(max_new_tokens=3)
recs = json.loads((data / 'test/stage2_categories.json').read_text())[:12]
OV = "<image>\nThis provides an overview of the picture.\n"
stats = collections.Counter()
for r in recs:
    rec = parse_record(r); masks = record_masks(rec); enc = pipe.encode_image(data / rec.file_name)
    for k, a in enumerate(rec.annotation):
        cat = a.category_name
        if cat not in SHAPES: continue
        prompts = [pipe.prepare(enc, [("human", OV + f"Is there a {s} in <mask><pos>?")], masks[k:k+1]) for s in SHAPES]
        ans = [g.raw_text.strip().split()[0] if g.raw_text.strip() else '' for g in pipe.generate(prompts, params)]
        yes = [s for s, x in zip(SHAPES, ans) if x.lower().startswith('yes')]
        stats['regions'] += 1; stats['yes_true'] += cat in yes; stats['yes_count'] += len(yes)
        print(cat, '->', yes)
print(stats)
