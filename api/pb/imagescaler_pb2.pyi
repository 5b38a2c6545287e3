from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScaleImageRequest(_message.Message):
    __slots__ = ("image",)
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    image: Image
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("content", "source")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    source: ImageSource
    def __init__(self, content: _Optional[bytes] = ..., source: _Optional[_Union[ImageSource, _Mapping]] = ...) -> None: ...

class ImageSource(_message.Message):
    __slots__ = ("http_uri",)
    HTTP_URI_FIELD_NUMBER: _ClassVar[int]
    http_uri: str
    def __init__(self, http_uri: _Optional[str] = ...) -> None: ...

class ScaleImageReply(_message.Message):
    __slots__ = ("content", "info")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    info: ProcessingInfo
    def __init__(self, content: _Optional[bytes] = ..., info: _Optional[_Union[ProcessingInfo, _Mapping]] = ...) -> None: ...

class ProcessingInfo(_message.Message):
    __slots__ = ("original_width", "original_height", "orientation", "output_width", "output_height", "scale_x", "scale_y", "crop_x", "crop_y", "crop_width", "crop_height", "pad_x", "pad_y", "scaled", "grayscale", "format", "content_type", "fit", "color", "passthrough", "processing_ms")
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIENTATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_X_FIELD_NUMBER: _ClassVar[int]
    SCALE_Y_FIELD_NUMBER: _ClassVar[int]
    CROP_X_FIELD_NUMBER: _ClassVar[int]
    CROP_Y_FIELD_NUMBER: _ClassVar[int]
    CROP_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CROP_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAD_X_FIELD_NUMBER: _ClassVar[int]
    PAD_Y_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    GRAYSCALE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    FIT_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    PASSTHROUGH_FIELD_NUMBER: _ClassVar[int]
    PROCESSING_MS_FIELD_NUMBER: _ClassVar[int]
    original_width: int
    original_height: int
    orientation: int
    output_width: int
    output_height: int
    scale_x: float
    scale_y: float
    crop_x: int
    crop_y: int
    crop_width: int
    crop_height: int
    pad_x: int
    pad_y: int
    scaled: bool
    grayscale: bool
    format: str
    content_type: str
    fit: str
    color: str
    passthrough: bool
    processing_ms: float
    def __init__(self, original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., orientation: _Optional[int] = ..., output_width: _Optional[int] = ..., output_height: _Optional[int] = ..., scale_x: _Optional[float] = ..., scale_y: _Optional[float] = ..., crop_x: _Optional[int] = ..., crop_y: _Optional[int] = ..., crop_width: _Optional[int] = ..., crop_height: _Optional[int] = ..., pad_x: _Optional[int] = ..., pad_y: _Optional[int] = ..., scaled: _Optional[bool] = ..., grayscale: _Optional[bool] = ..., format: _Optional[str] = ..., content_type: _Optional[str] = ..., fit: _Optional[str] = ..., color: _Optional[str] = ..., passthrough: _Optional[bool] = ..., processing_ms: _Optional[float] = ...) -> None: ...
