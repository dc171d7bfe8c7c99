"""The GraphQL documents the sidecar sends to Stigg, written against Stigg's public schema.

Only data: one string per operation, selecting exactly the fields records.py reads.
"""

ENTITLEMENT_FIELDS = """
fragment FeatureEntitlementFields on FeatureEntitlement {
  __typename
  isGranted
  accessDeniedReason
  usageLimit
  hasUnlimitedUsage
  hasSoftLimit
  currentUsage
  enumValues
  entitlementUpdatedAt
  usageUpdatedAt
  usagePeriodAnchor
  usagePeriodStart
  usagePeriodEnd
  resetPeriod
  validUntil
  creditRate { amount currencyId }
  feature {
    featureType
    meterType
    featureUnits
    featureUnitsPlural
    description
    displayName
    refId
  }
}

fragment CreditEntitlementFields on CreditEntitlement {
  __typename
  isGranted
  accessDeniedReason
  currency { currencyId displayName description unitSingular unitPlural additionalMetaData }
  usageLimit
  currentUsage
  hasSoftLimit
  usageUpdatedAt
  entitlementUpdatedAt
  usagePeriodEnd
  validUntil
}
"""

GET_ENTITLEMENTS_STATE = (
    """
query GetEntitlementsState($query: FetchEntitlementsQuery!) {
  entitlementsState(query: $query) {
    accessDeniedReason
    entitlementsV2 {
      ... on FeatureEntitlement { ...FeatureEntitlementFields }
      ... on CreditEntitlement { ...CreditEntitlementFields }
    }
  }
}
"""
    + ENTITLEMENT_FIELDS
)

GET_SDK_CONFIGURATION = """
query GetSdkConfiguration {
  sdkConfiguration { sentryDsn isWidgetWatermarkEnabled }
}
"""

USAGE_RESULT_FIELDS = """
  id
  featureId
  customerId
  resourceId
  currentUsage
  usagePeriodStart
  usagePeriodEnd
  nextResetDate
  timestamp
  credit { currencyId currentUsage usagePeriodEnd timestamp consumed }
"""

REPORT_USAGE = f"""
mutation ReportUsage($input: ReportUsageInput!) {{
  reportUsage(input: $input) {{{USAGE_RESULT_FIELDS}}}
}}
"""

REPORT_USAGE_BULK = f"""
mutation ReportUsageBulk($input: ReportUsageBulkInput!) {{
  reportUsageBulk(input: $input) {{{USAGE_RESULT_FIELDS}}}
}}
"""

REPORT_EVENT = """
mutation ReportEvent($input: UsageEventsReportInput!) {
  reportEvent(events: $input)
}
"""

ON_ENTITLEMENTS_UPDATED = (
    """
subscription OnEntitlementsUpdatedV2 {
  entitlementsUpdatedV2 {
    customerId
    resourceId
    accessDeniedReason
    entitlements {
      ... on FeatureEntitlement { ...FeatureEntitlementFields }
      ... on CreditEntitlement { ...CreditEntitlementFields }
    }
  }
}
"""
    + ENTITLEMENT_FIELDS
)

ON_USAGE_UPDATED = """
subscription OnUsageUpdatedV2 {
  usageUpdatedV2 {
    customerId
    resourceId
    entitlementReference { id type }
    usage { currentUsage usageUpdatedAt usagePeriodStart usagePeriodEnd }
  }
}
"""

ON_PACKAGE_PUBLISHED = """
subscription OnPackagePublished {
  packagePublished { accountId environmentId packageType packageRefId packageVersion migrationType }
}
"""

SUBSCRIPTIONS = {
    "entitlementsUpdatedV2": ("OnEntitlementsUpdatedV2", ON_ENTITLEMENTS_UPDATED),
    "usageUpdatedV2": ("OnUsageUpdatedV2", ON_USAGE_UPDATED),
    "packagePublished": ("OnPackagePublished", ON_PACKAGE_PUBLISHED),
}
