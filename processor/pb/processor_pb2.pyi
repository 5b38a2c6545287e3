from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FitMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIT_MODE_UNSPECIFIED: _ClassVar[FitMode]
    FIT_MODE_FIT: _ClassVar[FitMode]
    FIT_MODE_FILL: _ClassVar[FitMode]
    FIT_MODE_PAD: _ClassVar[FitMode]
    FIT_MODE_STRETCH: _ClassVar[FitMode]

class Format(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FORMAT_UNSPECIFIED: _ClassVar[Format]
    FORMAT_JPEG: _ClassVar[Format]
    FORMAT_PNG: _ClassVar[Format]
    FORMAT_WEBP: _ClassVar[Format]
FIT_MODE_UNSPECIFIED: FitMode
FIT_MODE_FIT: FitMode
FIT_MODE_FILL: FitMode
FIT_MODE_PAD: FitMode
FIT_MODE_STRETCH: FitMode
FORMAT_UNSPECIFIED: Format
FORMAT_JPEG: Format
FORMAT_PNG: Format
FORMAT_WEBP: Format

class Scaling(_message.Message):
    __slots__ = ("width", "height", "mode", "pad_color")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PAD_COLOR_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    mode: FitMode
    pad_color: int
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., mode: _Optional[_Union[FitMode, str]] = ..., pad_color: _Optional[int] = ...) -> None: ...

class ProcessRequest(_message.Message):
    __slots__ = ("image", "scaling", "grayscale", "format", "quality")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    GRAYSCALE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    scaling: Scaling
    grayscale: bool
    format: Format
    quality: int
    def __init__(self, image: _Optional[bytes] = ..., scaling: _Optional[_Union[Scaling, _Mapping]] = ..., grayscale: _Optional[bool] = ..., format: _Optional[_Union[Format, str]] = ..., quality: _Optional[int] = ...) -> None: ...

class Geometry(_message.Message):
    __slots__ = ("original_width", "original_height", "orientation", "output_width", "output_height", "scale_x", "scale_y", "crop_x", "crop_y", "crop_width", "crop_height", "pad_x", "pad_y")
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
    def __init__(self, original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., orientation: _Optional[int] = ..., output_width: _Optional[int] = ..., output_height: _Optional[int] = ..., scale_x: _Optional[float] = ..., scale_y: _Optional[float] = ..., crop_x: _Optional[int] = ..., crop_y: _Optional[int] = ..., crop_width: _Optional[int] = ..., crop_height: _Optional[int] = ..., pad_x: _Optional[int] = ..., pad_y: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "transform_ms", "encode_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    transform_ms: float
    encode_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., transform_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ...) -> None: ...

class ProcessReply(_message.Message):
    __slots__ = ("image", "geometry", "format", "scaled", "grayscale", "mode", "color", "passthrough", "timings", "input_format")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SCALED_FIELD_NUMBER: _ClassVar[int]
    GRAYSCALE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    COLOR_FIELD_NUMBER: _ClassVar[int]
    PASSTHROUGH_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    INPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    geometry: Geometry
    format: Format
    scaled: bool
    grayscale: bool
    mode: FitMode
    color: str
    passthrough: bool
    timings: Timings
    input_format: str
    def __init__(self, image: _Optional[bytes] = ..., geometry: _Optional[_Union[Geometry, _Mapping]] = ..., format: _Optional[_Union[Format, str]] = ..., scaled: _Optional[bool] = ..., grayscale: _Optional[bool] = ..., mode: _Optional[_Union[FitMode, str]] = ..., color: _Optional[str] = ..., passthrough: _Optional[bool] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., input_format: _Optional[str] = ...) -> None: ...
