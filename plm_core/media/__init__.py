"""Media decoding and pixel preprocessing: images (thumbnail + tiles) and videos (sampled frames), like HF's PLM.

Modules: `errors` (MediaError), `sources` (data:/file:// URLs and paths), `image` (decode, tile grid,
preprocess), `video` (probe, HF-equal frame sampling, sparse decoding, preprocess). Import from them
directly; this package itself imports nothing heavy.
"""
