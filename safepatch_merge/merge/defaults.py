"""Default SafePatching merge parameters — ours, not the paper's (arXiv 2405.13820 publishes
no values for a, b, p, α, β), kept because the frontier study's validation screen found no
configuration that beats them (docs/design.md §1.8). Every default of the merge lives here and
nowhere else."""

TOP_RATE_SE = 0.1        # a: fraction of SE-scored parameters in T_SE
TOP_RATE_OSM = 0.1       # b: fraction of OSM-scored parameters in T_OSM
ALPHA = 1.0              # scale of the SE patch
BETA = 1.0               # scale of the OSM patch
RETENTION = 1.0          # p: Bernoulli retention rate (1 = keep every selected element)
RESCALE = False          # DARE-style division of kept deltas by p
RETENTION_ORDER = "after_selection"  # retention drawn after the top-k selection (density a·p)
MASK_MODE = "difference"  # the method; intersection / topk / none are ablations
GRANULARITY = "global"   # one threshold over all scored tensors
SEED = 0                 # Philox key word 0 of the retention draw
PATCH_FORMAT = "full"    # patches are full patched checkpoints ("delta": task vectors)
OUTPUT_DTYPE = "auto"    # auto = the backbone's dtype, tensor by tensor
MAX_SHARD_SIZE = "5GB"   # output shard size, as transformers' save_pretrained default
NONFINITE_PATCH = "error"  # NaN/Inf in a patch: error | skip (those elements keep the backbone)

# The values each choice may take. The ops and the selector validate the same names at the
# point of use; tests/test_merge_config.py checks that the lists agree.
PATCH_FORMATS = ("full", "delta")
NONFINITE_CHOICES = ("error", "skip")
MASK_MODES = ("difference", "intersection", "topk", "none")
GRANULARITIES = ("global", "layer", "tensor")
RETENTION_ORDERS = ("after_selection", "before_selection")
OUTPUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
