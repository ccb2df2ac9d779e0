"""Yes/no answers of a model on the first N records of stage3_pos_neg (test split), as bench.region_eval asks them:
the confusion (truth, answer) and accuracy per question form. Run: python posneg_answers.py MODEL N DATA"""
import collections
import re
import sys
from pathlib import Path

import numpy as np

from bench.region_eval import split_records, yes_no
from osprey.data.samples import build_sample
from osprey.inference import OspreyPipeline, SamplingParams

data = Path(sys.argv[3] if len(sys.argv) > 3 else 'data/synth')
pipe = OspreyPipeline.from_pretrained(sys.argv[1], device='cpu')
params = SamplingParams(max_new_tokens=6)
rng = np.random.default_rng(0)
conf = collections.Counter(); bytype = collections.defaultdict(collections.Counter)
for record in list(split_records(data, 'test', 'stage3_pos_neg', int(sys.argv[2]))):
    sample = build_sample(record, 3, 'pos_neg', data, rng)
    masks = sample.masks(); enc = pipe.encode_image(data / record.file_name)
    qs = [t.value for t in record.conversations if t.speaker == 'human']
    prompts, truths = [], []
    for turn in range(0, len(sample.messages), 2):
        history = sample.messages[: turn + 1]
        used = sum(text.count('<mask>') for _, text in history)
        prompts.append(pipe.prepare(enc, history, masks[:used])); truths.append(sample.messages[turn+1][1])
    for a, t, q in zip(pipe.generate(prompts, params), truths, qs):
        p = yes_no(a.raw_text); conf[(yes_no(t), p)] += 1
        kind = 'colour' if re.search(r'red|green|blue|yellow|orange|purple|pink|brown|cyan|black', q) else 'position' if re.search(r' of the image', q) else q.split('<region')[0] + '...' + q.split('>')[-1][:25]
        bytype[kind][(yes_no(t) == p)] += 1
print(conf)
for k, v in sorted(bytype.items(), key=lambda kv: -sum(kv[1].values()))[:15]: print(k, dict(v))
