"""Publishing patched models: `check_model_dir` (is it complete?) and `push_model` (upload
to the Hugging Face Hub with huggingface_hub)."""
from .check import UploadFile, check_model_dir, list_upload_files
from .hub import PushResult, human_size, push_model

__all__ = ["UploadFile", "check_model_dir", "list_upload_files", "PushResult", "human_size",
           "push_model"]
