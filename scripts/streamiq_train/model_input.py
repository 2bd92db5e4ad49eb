"""What the daemon feeds a model: SIZE x SIZE RGB pixels in 0..1, normalised with CLIP's
mean and standard deviation per channel (the bundle manifest's `[input]`). Standard
library only, so every script can import it."""

SIZE = 224          # model input
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
