"""Cache methods by name: eviction methods (one file each), quantizers (KIVI, OTT) and modifiers (CaliDrop)."""

from kvrt.cache.methods.calidrop import CaliDrop
from kvrt.cache.methods.h2o import H2O
from kvrt.cache.methods.kivi import KIVI
from kvrt.cache.methods.ott import OTT
from kvrt.cache.methods.pyramidkv import PyramidKV
from kvrt.cache.methods.snapkv import SnapKV
from kvrt.cache.methods.streaming import StreamingLLM

EVICTION_METHODS = {cls.name: cls for cls in (StreamingLLM, H2O, SnapKV, PyramidKV)}
QUANTIZERS = {cls.name: cls for cls in (KIVI, OTT)}
MODIFIERS = {cls.name: cls for cls in (CaliDrop,)}
