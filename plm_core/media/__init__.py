"""Media for PLM, as HF's processor makes it: images (thumbnail + tiles), videos (sampled frames).

Import from the modules directly; this package itself imports nothing heavy.
- `errors`: MediaError, safe descriptions of library errors
- `sources`: bytes of data: URLs, file:// URLs and local paths
- `settings`: typed per-item settings (ImageSettings, VideoSettings, FrameSampling) and cache keys
- `loader`: one media reference -> MediaItem + raw pixels -> preprocessed pixels
- `raw_cache`: what decoding bytes gave (tile counts, meta), so repeated bytes are not decoded
- images: `image` (decoding with limits), `tiling` (tile grid), `rgb` (in-memory -> RGB tensors)
- videos: `containers` (sniff, probe), `sampling` (frame policy, HF's indices), `video` (decoding
  the sampled frames), `seek_decoder`, `frame_buffer`, `thread_pool`
- pixels: `pixels` (resize, normalise, buffers), `preprocess` (settings -> model pixels)
- `hashing`: content hashes
"""
