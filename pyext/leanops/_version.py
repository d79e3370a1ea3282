__version__ = "0.1.0"

# Version of the on-disk format written by leanops.save_quantized. Bump it whenever a packed
# layout or a tensor's meaning changes; load_quantized refuses files of another version.
FORMAT_VERSION = 1
