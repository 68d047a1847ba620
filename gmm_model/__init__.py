"""The GMM model: frozen encoder, trained projection, frozen LLM, matcher. Nothing platform-specific."""
from .matcher import OpenCLIPTextMatcher, SentenceTransformerMatcher, TextMatcher
from .model import GMM, ConstrainedPrediction
from .projection import Projection
from .prompt import PromptFormat, normalise_class_name
from .stack import PRESETS, ModelStack, create_encoder, create_gmm, create_matcher
from .vision import VisionEncoder

__all__ = ["GMM", "ConstrainedPrediction", "ModelStack", "OpenCLIPTextMatcher", "PRESETS", "Projection", "PromptFormat",
           "SentenceTransformerMatcher", "TextMatcher", "VisionEncoder", "create_encoder", "create_gmm",
           "create_matcher", "normalise_class_name"]
