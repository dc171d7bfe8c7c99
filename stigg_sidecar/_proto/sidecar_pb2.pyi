import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AccessDeniedReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_DENIED_REASON_UNSPECIFIED: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_UNKNOWN: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_CUSTOMER_IS_ARCHIVED: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_CUSTOMER_NOT_FOUND: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_CUSTOMER_RESOURCE_NOT_FOUND: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_FEATURE_NOT_FOUND: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_NO_ACTIVE_SUBSCRIPTION: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_BUDGET_EXCEEDED: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_REQUESTED_VALUES_MISMATCH: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_FEATURE_TYPE_MISMATCH: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_INSUFFICIENT_CREDITS: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_REVOKED: _ClassVar[AccessDeniedReason]
    ACCESS_DENIED_REASON_ENTITLEMENT_NOT_FOUND: _ClassVar[AccessDeniedReason]

class FeatureType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_TYPE_UNSPECIFIED: _ClassVar[FeatureType]
    FEATURE_TYPE_BOOLEAN: _ClassVar[FeatureType]
    FEATURE_TYPE_NUMBER: _ClassVar[FeatureType]
    FEATURE_TYPE_ENUM: _ClassVar[FeatureType]

class MeterType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METER_TYPE_UNSPECIFIED: _ClassVar[MeterType]
    METER_TYPE_NONE: _ClassVar[MeterType]
    METER_TYPE_FLUCTUATING: _ClassVar[MeterType]
    METER_TYPE_INCREMENTAL: _ClassVar[MeterType]

class EntitlementResetPeriod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTITLEMENT_RESET_PERIOD_UNSPECIFIED: _ClassVar[EntitlementResetPeriod]
    ENTITLEMENT_RESET_PERIOD_DAY: _ClassVar[EntitlementResetPeriod]
    ENTITLEMENT_RESET_PERIOD_HOUR: _ClassVar[EntitlementResetPeriod]
    ENTITLEMENT_RESET_PERIOD_MONTH: _ClassVar[EntitlementResetPeriod]
    ENTITLEMENT_RESET_PERIOD_WEEK: _ClassVar[EntitlementResetPeriod]
    ENTITLEMENT_RESET_PERIOD_YEAR: _ClassVar[EntitlementResetPeriod]

class UsageUpdateBehavior(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_UPDATE_BEHAVIOR_UNSPECIFIED: _ClassVar[UsageUpdateBehavior]
    USAGE_UPDATE_BEHAVIOR_DELTA: _ClassVar[UsageUpdateBehavior]
    USAGE_UPDATE_BEHAVIOR_SET: _ClassVar[UsageUpdateBehavior]
ACCESS_DENIED_REASON_UNSPECIFIED: AccessDeniedReason
ACCESS_DENIED_REASON_UNKNOWN: AccessDeniedReason
ACCESS_DENIED_REASON_CUSTOMER_IS_ARCHIVED: AccessDeniedReason
ACCESS_DENIED_REASON_CUSTOMER_NOT_FOUND: AccessDeniedReason
ACCESS_DENIED_REASON_CUSTOMER_RESOURCE_NOT_FOUND: AccessDeniedReason
ACCESS_DENIED_REASON_FEATURE_NOT_FOUND: AccessDeniedReason
ACCESS_DENIED_REASON_NO_ACTIVE_SUBSCRIPTION: AccessDeniedReason
ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION: AccessDeniedReason
ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT: AccessDeniedReason
ACCESS_DENIED_REASON_BUDGET_EXCEEDED: AccessDeniedReason
ACCESS_DENIED_REASON_REQUESTED_VALUES_MISMATCH: AccessDeniedReason
ACCESS_DENIED_REASON_FEATURE_TYPE_MISMATCH: AccessDeniedReason
ACCESS_DENIED_REASON_INSUFFICIENT_CREDITS: AccessDeniedReason
ACCESS_DENIED_REASON_REVOKED: AccessDeniedReason
ACCESS_DENIED_REASON_ENTITLEMENT_NOT_FOUND: AccessDeniedReason
FEATURE_TYPE_UNSPECIFIED: FeatureType
FEATURE_TYPE_BOOLEAN: FeatureType
FEATURE_TYPE_NUMBER: FeatureType
FEATURE_TYPE_ENUM: FeatureType
METER_TYPE_UNSPECIFIED: MeterType
METER_TYPE_NONE: MeterType
METER_TYPE_FLUCTUATING: MeterType
METER_TYPE_INCREMENTAL: MeterType
ENTITLEMENT_RESET_PERIOD_UNSPECIFIED: EntitlementResetPeriod
ENTITLEMENT_RESET_PERIOD_DAY: EntitlementResetPeriod
ENTITLEMENT_RESET_PERIOD_HOUR: EntitlementResetPeriod
ENTITLEMENT_RESET_PERIOD_MONTH: EntitlementResetPeriod
ENTITLEMENT_RESET_PERIOD_WEEK: EntitlementResetPeriod
ENTITLEMENT_RESET_PERIOD_YEAR: EntitlementResetPeriod
USAGE_UPDATE_BEHAVIOR_UNSPECIFIED: UsageUpdateBehavior
USAGE_UPDATE_BEHAVIOR_DELTA: UsageUpdateBehavior
USAGE_UPDATE_BEHAVIOR_SET: UsageUpdateBehavior

class EntitlementFeature(_message.Message):
    __slots__ = ("id", "feature_type", "units", "units_plural", "meter_type", "is_metered")
    ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_TYPE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    UNITS_PLURAL_FIELD_NUMBER: _ClassVar[int]
    METER_TYPE_FIELD_NUMBER: _ClassVar[int]
    IS_METERED_FIELD_NUMBER: _ClassVar[int]
    id: str
    feature_type: FeatureType
    units: str
    units_plural: str
    meter_type: MeterType
    is_metered: bool
    def __init__(self, id: _Optional[str] = ..., feature_type: _Optional[_Union[FeatureType, str]] = ..., units: _Optional[str] = ..., units_plural: _Optional[str] = ..., meter_type: _Optional[_Union[MeterType, str]] = ..., is_metered: _Optional[bool] = ...) -> None: ...

class BooleanEntitlement(_message.Message):
    __slots__ = ("feature",)
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    feature: EntitlementFeature
    def __init__(self, feature: _Optional[_Union[EntitlementFeature, _Mapping]] = ...) -> None: ...

class NumericEntitlement(_message.Message):
    __slots__ = ("feature", "value", "is_unlimited")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    IS_UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    feature: EntitlementFeature
    value: int
    is_unlimited: bool
    def __init__(self, feature: _Optional[_Union[EntitlementFeature, _Mapping]] = ..., value: _Optional[int] = ..., is_unlimited: _Optional[bool] = ...) -> None: ...

class MeteredEntitlement(_message.Message):
    __slots__ = ("feature", "usage_limit", "is_unlimited", "current_usage", "reset_period", "next_reset_date", "usage_period_anchor", "usage_period_start", "usage_period_end", "has_soft_limit")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    USAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    IS_UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_USAGE_FIELD_NUMBER: _ClassVar[int]
    RESET_PERIOD_FIELD_NUMBER: _ClassVar[int]
    NEXT_RESET_DATE_FIELD_NUMBER: _ClassVar[int]
    USAGE_PERIOD_ANCHOR_FIELD_NUMBER: _ClassVar[int]
    USAGE_PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    USAGE_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    HAS_SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    feature: EntitlementFeature
    usage_limit: float
    is_unlimited: bool
    current_usage: float
    reset_period: EntitlementResetPeriod
    next_reset_date: _timestamp_pb2.Timestamp
    usage_period_anchor: _timestamp_pb2.Timestamp
    usage_period_start: _timestamp_pb2.Timestamp
    usage_period_end: _timestamp_pb2.Timestamp
    has_soft_limit: bool
    def __init__(self, feature: _Optional[_Union[EntitlementFeature, _Mapping]] = ..., usage_limit: _Optional[float] = ..., is_unlimited: _Optional[bool] = ..., current_usage: _Optional[float] = ..., reset_period: _Optional[_Union[EntitlementResetPeriod, str]] = ..., next_reset_date: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage_period_anchor: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage_period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage_period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., has_soft_limit: _Optional[bool] = ...) -> None: ...

class EnumEntitlement(_message.Message):
    __slots__ = ("feature", "enum_values")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ENUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    feature: EntitlementFeature
    enum_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, feature: _Optional[_Union[EntitlementFeature, _Mapping]] = ..., enum_values: _Optional[_Iterable[str]] = ...) -> None: ...

class Entitlement(_message.Message):
    __slots__ = ("boolean", "numeric", "metered", "enum")
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    ENUM_FIELD_NUMBER: _ClassVar[int]
    boolean: BooleanEntitlement
    numeric: NumericEntitlement
    metered: MeteredEntitlement
    enum: EnumEntitlement
    def __init__(self, boolean: _Optional[_Union[BooleanEntitlement, _Mapping]] = ..., numeric: _Optional[_Union[NumericEntitlement, _Mapping]] = ..., metered: _Optional[_Union[MeteredEntitlement, _Mapping]] = ..., enum: _Optional[_Union[EnumEntitlement, _Mapping]] = ...) -> None: ...

class EntitlementCurrency(_message.Message):
    __slots__ = ("currency_id", "display_name", "description", "unit_singular", "unit_plural", "additional_meta_data")
    CURRENCY_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    UNIT_SINGULAR_FIELD_NUMBER: _ClassVar[int]
    UNIT_PLURAL_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_META_DATA_FIELD_NUMBER: _ClassVar[int]
    currency_id: str
    display_name: str
    description: str
    unit_singular: str
    unit_plural: str
    additional_meta_data: _struct_pb2.Struct
    def __init__(self, currency_id: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., unit_singular: _Optional[str] = ..., unit_plural: _Optional[str] = ..., additional_meta_data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CreditEntitlement(_message.Message):
    __slots__ = ("currency", "usage_limit", "current_usage", "remaining", "usage_period_end", "has_soft_limit")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    USAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_USAGE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    USAGE_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    HAS_SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    currency: EntitlementCurrency
    usage_limit: float
    current_usage: float
    remaining: float
    usage_period_end: _timestamp_pb2.Timestamp
    has_soft_limit: bool
    def __init__(self, currency: _Optional[_Union[EntitlementCurrency, _Mapping]] = ..., usage_limit: _Optional[float] = ..., current_usage: _Optional[float] = ..., remaining: _Optional[float] = ..., usage_period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., has_soft_limit: _Optional[bool] = ...) -> None: ...

class EntitlementV2(_message.Message):
    __slots__ = ("has_access", "is_fallback", "access_denied_reason", "boolean", "numeric", "metered", "enum", "credit")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    ENUM_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    is_fallback: bool
    access_denied_reason: AccessDeniedReason
    boolean: BooleanEntitlement
    numeric: NumericEntitlement
    metered: MeteredEntitlement
    enum: EnumEntitlement
    credit: CreditEntitlement
    def __init__(self, has_access: _Optional[bool] = ..., is_fallback: _Optional[bool] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ..., boolean: _Optional[_Union[BooleanEntitlement, _Mapping]] = ..., numeric: _Optional[_Union[NumericEntitlement, _Mapping]] = ..., metered: _Optional[_Union[MeteredEntitlement, _Mapping]] = ..., enum: _Optional[_Union[EnumEntitlement, _Mapping]] = ..., credit: _Optional[_Union[CreditEntitlement, _Mapping]] = ...) -> None: ...

class GetEntitlementV2Request(_message.Message):
    __slots__ = ("customer_id", "resource_id", "feature_id", "currency_id", "options")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    resource_id: str
    feature_id: str
    currency_id: str
    options: GetEntitlementOptions
    def __init__(self, customer_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., currency_id: _Optional[str] = ..., options: _Optional[_Union[GetEntitlementOptions, _Mapping]] = ...) -> None: ...

class GetEntitlementV2Response(_message.Message):
    __slots__ = ("entitlement",)
    ENTITLEMENT_FIELD_NUMBER: _ClassVar[int]
    entitlement: EntitlementV2
    def __init__(self, entitlement: _Optional[_Union[EntitlementV2, _Mapping]] = ...) -> None: ...

class GetEntitlementsStateV2Request(_message.Message):
    __slots__ = ("customer_id", "resource_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    resource_id: str
    def __init__(self, customer_id: _Optional[str] = ..., resource_id: _Optional[str] = ...) -> None: ...

class GetEntitlementsStateV2Response(_message.Message):
    __slots__ = ("entitlements", "access_denied_reason")
    ENTITLEMENTS_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    entitlements: _containers.RepeatedCompositeFieldContainer[EntitlementV2]
    access_denied_reason: AccessDeniedReason
    def __init__(self, entitlements: _Optional[_Iterable[_Union[EntitlementV2, _Mapping]]] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ...) -> None: ...

class GetEntitlementsRequest(_message.Message):
    __slots__ = ("customer_id", "resource_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    resource_id: str
    def __init__(self, customer_id: _Optional[str] = ..., resource_id: _Optional[str] = ...) -> None: ...

class GetEntitlementsResponse(_message.Message):
    __slots__ = ("entitlements", "access_denied_reason")
    ENTITLEMENTS_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    entitlements: _containers.RepeatedCompositeFieldContainer[Entitlement]
    access_denied_reason: AccessDeniedReason
    def __init__(self, entitlements: _Optional[_Iterable[_Union[Entitlement, _Mapping]]] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ...) -> None: ...

class GetEntitlementFallback(_message.Message):
    __slots__ = ("has_access", "value", "is_unlimited", "usage_limit", "enum_values")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    IS_UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    USAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ENUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    value: int
    is_unlimited: bool
    usage_limit: float
    enum_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, has_access: _Optional[bool] = ..., value: _Optional[int] = ..., is_unlimited: _Optional[bool] = ..., usage_limit: _Optional[float] = ..., enum_values: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEntitlementOptions(_message.Message):
    __slots__ = ("fallback", "requested_usage", "requested_values")
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_VALUES_FIELD_NUMBER: _ClassVar[int]
    fallback: GetEntitlementFallback
    requested_usage: float
    requested_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fallback: _Optional[_Union[GetEntitlementFallback, _Mapping]] = ..., requested_usage: _Optional[float] = ..., requested_values: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEntitlementRequest(_message.Message):
    __slots__ = ("customer_id", "feature_id", "resource_id", "options")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature_id: str
    resource_id: str
    options: GetEntitlementOptions
    def __init__(self, customer_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., options: _Optional[_Union[GetEntitlementOptions, _Mapping]] = ...) -> None: ...

class GetEntitlementResponse(_message.Message):
    __slots__ = ("has_access", "is_fallback", "access_denied_reason", "boolean", "numeric", "metered", "enum")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    ENUM_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    is_fallback: bool
    access_denied_reason: AccessDeniedReason
    boolean: BooleanEntitlement
    numeric: NumericEntitlement
    metered: MeteredEntitlement
    enum: EnumEntitlement
    def __init__(self, has_access: _Optional[bool] = ..., is_fallback: _Optional[bool] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ..., boolean: _Optional[_Union[BooleanEntitlement, _Mapping]] = ..., numeric: _Optional[_Union[NumericEntitlement, _Mapping]] = ..., metered: _Optional[_Union[MeteredEntitlement, _Mapping]] = ..., enum: _Optional[_Union[EnumEntitlement, _Mapping]] = ...) -> None: ...

class BooleanEntitlementFallback(_message.Message):
    __slots__ = ("has_access",)
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    def __init__(self, has_access: _Optional[bool] = ...) -> None: ...

class BooleanEntitlementOptions(_message.Message):
    __slots__ = ("fallback",)
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    fallback: BooleanEntitlementFallback
    def __init__(self, fallback: _Optional[_Union[BooleanEntitlementFallback, _Mapping]] = ...) -> None: ...

class GetBooleanEntitlementRequest(_message.Message):
    __slots__ = ("customer_id", "feature_id", "resource_id", "options")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature_id: str
    resource_id: str
    options: BooleanEntitlementOptions
    def __init__(self, customer_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., options: _Optional[_Union[BooleanEntitlementOptions, _Mapping]] = ...) -> None: ...

class GetBooleanEntitlementResponse(_message.Message):
    __slots__ = ("has_access", "is_fallback", "access_denied_reason", "entitlement")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENT_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    is_fallback: bool
    access_denied_reason: AccessDeniedReason
    entitlement: BooleanEntitlement
    def __init__(self, has_access: _Optional[bool] = ..., is_fallback: _Optional[bool] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ..., entitlement: _Optional[_Union[BooleanEntitlement, _Mapping]] = ...) -> None: ...

class NumericEntitlementFallback(_message.Message):
    __slots__ = ("has_access", "value", "is_unlimited")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    IS_UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    value: int
    is_unlimited: bool
    def __init__(self, has_access: _Optional[bool] = ..., value: _Optional[int] = ..., is_unlimited: _Optional[bool] = ...) -> None: ...

class NumericEntitlementOptions(_message.Message):
    __slots__ = ("fallback",)
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    fallback: NumericEntitlementFallback
    def __init__(self, fallback: _Optional[_Union[NumericEntitlementFallback, _Mapping]] = ...) -> None: ...

class GetNumericEntitlementRequest(_message.Message):
    __slots__ = ("customer_id", "feature_id", "resource_id", "options")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature_id: str
    resource_id: str
    options: NumericEntitlementOptions
    def __init__(self, customer_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., options: _Optional[_Union[NumericEntitlementOptions, _Mapping]] = ...) -> None: ...

class GetNumericEntitlementResponse(_message.Message):
    __slots__ = ("has_access", "is_fallback", "access_denied_reason", "entitlement")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENT_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    is_fallback: bool
    access_denied_reason: AccessDeniedReason
    entitlement: NumericEntitlement
    def __init__(self, has_access: _Optional[bool] = ..., is_fallback: _Optional[bool] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ..., entitlement: _Optional[_Union[NumericEntitlement, _Mapping]] = ...) -> None: ...

class MeteredEntitlementFallback(_message.Message):
    __slots__ = ("has_access", "usage_limit", "is_unlimited")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    USAGE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    IS_UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    usage_limit: float
    is_unlimited: bool
    def __init__(self, has_access: _Optional[bool] = ..., usage_limit: _Optional[float] = ..., is_unlimited: _Optional[bool] = ...) -> None: ...

class MeteredEntitlementOptions(_message.Message):
    __slots__ = ("requested_usage", "fallback")
    REQUESTED_USAGE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    requested_usage: float
    fallback: MeteredEntitlementFallback
    def __init__(self, requested_usage: _Optional[float] = ..., fallback: _Optional[_Union[MeteredEntitlementFallback, _Mapping]] = ...) -> None: ...

class GetMeteredEntitlementRequest(_message.Message):
    __slots__ = ("customer_id", "feature_id", "resource_id", "options")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature_id: str
    resource_id: str
    options: MeteredEntitlementOptions
    def __init__(self, customer_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., options: _Optional[_Union[MeteredEntitlementOptions, _Mapping]] = ...) -> None: ...

class GetMeteredEntitlementResponse(_message.Message):
    __slots__ = ("has_access", "is_fallback", "access_denied_reason", "requested_usage", "entitlement")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_USAGE_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENT_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    is_fallback: bool
    access_denied_reason: AccessDeniedReason
    requested_usage: float
    entitlement: MeteredEntitlement
    def __init__(self, has_access: _Optional[bool] = ..., is_fallback: _Optional[bool] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ..., requested_usage: _Optional[float] = ..., entitlement: _Optional[_Union[MeteredEntitlement, _Mapping]] = ...) -> None: ...

class EnumEntitlementFallback(_message.Message):
    __slots__ = ("has_access", "enum_values")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    ENUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    enum_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, has_access: _Optional[bool] = ..., enum_values: _Optional[_Iterable[str]] = ...) -> None: ...

class EnumEntitlementOptions(_message.Message):
    __slots__ = ("requested_values", "fallback")
    REQUESTED_VALUES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    requested_values: _containers.RepeatedScalarFieldContainer[str]
    fallback: EnumEntitlementFallback
    def __init__(self, requested_values: _Optional[_Iterable[str]] = ..., fallback: _Optional[_Union[EnumEntitlementFallback, _Mapping]] = ...) -> None: ...

class GetEnumEntitlementRequest(_message.Message):
    __slots__ = ("customer_id", "feature_id", "resource_id", "options")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    feature_id: str
    resource_id: str
    options: EnumEntitlementOptions
    def __init__(self, customer_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., options: _Optional[_Union[EnumEntitlementOptions, _Mapping]] = ...) -> None: ...

class GetEnumEntitlementResponse(_message.Message):
    __slots__ = ("has_access", "is_fallback", "access_denied_reason", "requested_values", "entitlement")
    HAS_ACCESS_FIELD_NUMBER: _ClassVar[int]
    IS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    ACCESS_DENIED_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_VALUES_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENT_FIELD_NUMBER: _ClassVar[int]
    has_access: bool
    is_fallback: bool
    access_denied_reason: AccessDeniedReason
    requested_values: _containers.RepeatedScalarFieldContainer[str]
    entitlement: EnumEntitlement
    def __init__(self, has_access: _Optional[bool] = ..., is_fallback: _Optional[bool] = ..., access_denied_reason: _Optional[_Union[AccessDeniedReason, str]] = ..., requested_values: _Optional[_Iterable[str]] = ..., entitlement: _Optional[_Union[EnumEntitlement, _Mapping]] = ...) -> None: ...

class RedisOptions(_message.Message):
    __slots__ = ("environment_prefix", "host", "port", "db", "username", "password", "ttl")
    ENVIRONMENT_PREFIX_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    DB_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    environment_prefix: str
    host: str
    port: int
    db: int
    username: str
    password: str
    ttl: int
    def __init__(self, environment_prefix: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., db: _Optional[int] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., ttl: _Optional[int] = ...) -> None: ...

class EntitlementFallback(_message.Message):
    __slots__ = ("boolean", "numeric", "metered", "enum")
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    METERED_FIELD_NUMBER: _ClassVar[int]
    ENUM_FIELD_NUMBER: _ClassVar[int]
    boolean: BooleanEntitlementFallback
    numeric: NumericEntitlementFallback
    metered: MeteredEntitlementFallback
    enum: EnumEntitlementFallback
    def __init__(self, boolean: _Optional[_Union[BooleanEntitlementFallback, _Mapping]] = ..., numeric: _Optional[_Union[NumericEntitlementFallback, _Mapping]] = ..., metered: _Optional[_Union[MeteredEntitlementFallback, _Mapping]] = ..., enum: _Optional[_Union[EnumEntitlementFallback, _Mapping]] = ...) -> None: ...

class ApiConfig(_message.Message):
    __slots__ = ("api_key", "api_url", "edge_enabled", "edge_api_url")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    API_URL_FIELD_NUMBER: _ClassVar[int]
    EDGE_ENABLED_FIELD_NUMBER: _ClassVar[int]
    EDGE_API_URL_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    api_url: str
    edge_enabled: bool
    edge_api_url: str
    def __init__(self, api_key: _Optional[str] = ..., api_url: _Optional[str] = ..., edge_enabled: _Optional[bool] = ..., edge_api_url: _Optional[str] = ...) -> None: ...

class LocalSidecarConfig(_message.Message):
    __slots__ = ("ws_enabled", "ws_url", "redis", "entitlements_fallback", "cache_max_size_bytes")
    class EntitlementsFallbackEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EntitlementFallback
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EntitlementFallback, _Mapping]] = ...) -> None: ...
    WS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    WS_URL_FIELD_NUMBER: _ClassVar[int]
    REDIS_FIELD_NUMBER: _ClassVar[int]
    ENTITLEMENTS_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    CACHE_MAX_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ws_enabled: bool
    ws_url: str
    redis: RedisOptions
    entitlements_fallback: _containers.MessageMap[str, EntitlementFallback]
    cache_max_size_bytes: int
    def __init__(self, ws_enabled: _Optional[bool] = ..., ws_url: _Optional[str] = ..., redis: _Optional[_Union[RedisOptions, _Mapping]] = ..., entitlements_fallback: _Optional[_Mapping[str, EntitlementFallback]] = ..., cache_max_size_bytes: _Optional[int] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("customer_id", "resource_id", "feature_id", "value", "update_behavior", "dimensions", "timestamp")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EventDimensionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EventDimensionValue, _Mapping]] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    resource_id: str
    feature_id: str
    value: float
    update_behavior: UsageUpdateBehavior
    dimensions: _containers.MessageMap[str, EventDimensionValue]
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, customer_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., value: _Optional[float] = ..., update_behavior: _Optional[_Union[UsageUpdateBehavior, str]] = ..., dimensions: _Optional[_Mapping[str, EventDimensionValue]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EventDimensionValue(_message.Message):
    __slots__ = ("string_value", "number_value", "boolean_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOLEAN_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    number_value: float
    boolean_value: bool
    def __init__(self, string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., boolean_value: _Optional[bool] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_name", "customer_id", "idempotency_key", "resource_id", "dimensions", "timestamp")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: EventDimensionValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[EventDimensionValue, _Mapping]] = ...) -> None: ...
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    event_name: str
    customer_id: str
    idempotency_key: str
    resource_id: str
    dimensions: _containers.MessageMap[str, EventDimensionValue]
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, event_name: _Optional[str] = ..., customer_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., resource_id: _Optional[str] = ..., dimensions: _Optional[_Mapping[str, EventDimensionValue]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("measurement_id", "customer_id", "resource_id", "feature_id", "current_usage", "usage_period_start", "usage_period_end")
    MEASUREMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    USAGE_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    measurement_id: str
    customer_id: str
    resource_id: str
    feature_id: str
    current_usage: float
    usage_period_start: _timestamp_pb2.Timestamp
    usage_period_end: _timestamp_pb2.Timestamp
    def __init__(self, measurement_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., resource_id: _Optional[str] = ..., feature_id: _Optional[str] = ..., current_usage: _Optional[float] = ..., usage_period_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., usage_period_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class ReloadEntitlementsRequest(_message.Message):
    __slots__ = ("customer_id", "resource_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    resource_id: str
    def __init__(self, customer_id: _Optional[str] = ..., resource_id: _Optional[str] = ...) -> None: ...

class ReloadEntitlementsResponse(_message.Message):
    __slots__ = ("entitled_entity_exists",)
    ENTITLED_ENTITY_EXISTS_FIELD_NUMBER: _ClassVar[int]
    entitled_entity_exists: bool
    def __init__(self, entitled_entity_exists: _Optional[bool] = ...) -> None: ...

class ReportUsageBulkRequest(_message.Message):
    __slots__ = ("usages",)
    USAGES_FIELD_NUMBER: _ClassVar[int]
    usages: _containers.RepeatedCompositeFieldContainer[ReportUsageRequest]
    def __init__(self, usages: _Optional[_Iterable[_Union[ReportUsageRequest, _Mapping]]] = ...) -> None: ...

class ReportUsageBulkResponse(_message.Message):
    __slots__ = ("usages",)
    USAGES_FIELD_NUMBER: _ClassVar[int]
    usages: _containers.RepeatedCompositeFieldContainer[ReportUsageResponse]
    def __init__(self, usages: _Optional[_Iterable[_Union[ReportUsageResponse, _Mapping]]] = ...) -> None: ...
