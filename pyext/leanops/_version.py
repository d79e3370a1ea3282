__version__ = "0.1.0"

# Version of the on-disk format written by leanops.save_quantized. Bump it whenever a packed
# layout or a tensor's meaning changes; load_quantized refuses files of another version.
# Per-tensor CRC-32 checksums were added to format 1 without a bump: older readers ignore the
# extra metadata, and files without checksums still load (tests/data holds one).
FORMAT_VERSION = 1
