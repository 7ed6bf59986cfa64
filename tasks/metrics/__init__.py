"""The benchmarks' own definitions: COCOeval, the VOC and ILSVRC devkits, localization errors, confusion
scores, and one table from a datamodule's protocol to its metric names and scorer. No Lightning."""
