from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Delivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_INLINE: _ClassVar[Delivery]
    DELIVERY_URL: _ClassVar[Delivery]
    DELIVERY_URL_AND_INLINE: _ClassVar[Delivery]
DELIVERY_INLINE: Delivery
DELIVERY_URL: Delivery
DELIVERY_URL_AND_INLINE: Delivery

class ScaleImageRequest(_message.Message):
    __slots__ = ("image", "delivery")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    image: Image
    delivery: Delivery
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., delivery: _Optional[_Union[Delivery, str]] = ...) -> None: ...

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
    __slots__ = ("content", "info", "stored", "storage_fallback")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    info: ProcessingInfo
    stored: StoredResult
    storage_fallback: bool
    def __init__(self, content: _Optional[bytes] = ..., info: _Optional[_Union[ProcessingInfo, _Mapping]] = ..., stored: _Optional[_Union[StoredResult, _Mapping]] = ..., storage_fallback: _Optional[bool] = ...) -> None: ...

class StoredResult(_message.Message):
    __slots__ = ("url", "expires_unix", "size", "content_type", "sha256")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    url: str
    expires_unix: int
    size: int
    content_type: str
    sha256: str
    def __init__(self, url: _Optional[str] = ..., expires_unix: _Optional[int] = ..., size: _Optional[int] = ..., content_type: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

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
