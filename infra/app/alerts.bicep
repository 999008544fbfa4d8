// Alerts on the app's own metrics in customMetrics (queue metrics are per storage account, not per queue), and an
// action group that emails and posts to a Microsoft Teams channel. Teams: a Logic App turns the common alert schema
// into an Adaptive Card and posts it to a Teams Workflows webhook ("Post to a channel when a webhook request is
// received"), so no connector needs a person to sign in. Every metric, dimension and value the queries use is in
// the registry of shared/telemetry.py (tests/infra/test_bicep.py checks it); docs/telemetry.md lists them.
param namePrefix string
@description('Name of the Logic App that posts alerts to Teams.')
param teamsRelayName string
param location string
param tags object
param applicationInsightsId string
@description('Who gets the alert emails.')
@minLength(1)
param alertEmails array
@secure()
@description('Teams Workflows webhook URL ("Post to a channel when a webhook request is received"); empty: email only.')
param teamsWebhookUrl string
@description('The billing entities the app syncs (SYNC_ENTITIES): each must complete a listing in time.')
@minLength(1)
param entities array
@description('Alert when failed, invalid and rejected records exceed this percentage of all records over an hour.')
param failureRatePercent string
@description('Alert when more DLQ rows than this are open.')
param dlqOpenRowsThreshold int
@description('Alert when more messages than this reach the poison queue within 15 minutes.')
param poisonMessagesThreshold int
@description('Minutes between fan-out ticks (SYNC_SCHEDULE), as main.bicep derived or was given them.')
@minValue(1)
param scheduleIntervalMinutes int
@description('Alert when no listing completed within this many schedule intervals.')
@minValue(1)
param missedRunIntervals int
@description('Alert when a breaker has been open (through every half-open probe) this many minutes.')
@minValue(1)
param breakerOpenMinutes int
@description('Alert when the app logs more exceptions than this within 15 minutes.')
param exceptionBurstThreshold int
@description('Alert when an entity\'s lag (time since its last complete listing started) exceeds this many minutes.')
@minValue(1)
param lagMinutes int
@description('Alert when billing webhooks are refused (bad signature, stale, malformed) more often than this in 15 minutes.')
param webhookRejectionsThreshold int
@description('Alert when the newest complete reconcile run found more than this share of an entity\'s records differing (a decimal with a dot).')
param reconcileDriftRatio string
@description('Alert when reconcile finds more new differences than this in a day.')
param reconcileNewMismatchesThreshold int
@description('The Key Vault whose secrets (billing API key, webhook secret, Dataverse client secret) are watched for expiry.')
param keyVaultId string
@description('Region of that Key Vault (its Event Grid system topic lives beside it).')
param keyVaultLocation string

var runbook = 'Runbook: docs/operations.md, "Alerts and what to do"'
var teams = !empty(teamsWebhookUrl)

resource teamsRelay 'Microsoft.Logic/workflows@2019-05-01' = if (teams) {
  name: teamsRelayName
  location: location
  tags: tags
  properties: {
    state: 'Enabled'
    definition: loadJsonContent('teams-relay.json')
    parameters: { teamsWebhookUrl: { value: teamsWebhookUrl } }
  }
}

resource teamsTrigger 'Microsoft.Logic/workflows/triggers@2019-05-01' existing = if (teams) {
  parent: teamsRelay
  name: 'alert'
}

var teamsReceiver = {
  name: 'teams'
  resourceId: teamsRelay!.id
  callbackUrl: teamsTrigger!.listCallbackUrl().value
  useCommonAlertSchema: true
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: '${namePrefix}ag'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'billingsync'
    enabled: true
    emailReceivers: [
      for (email, i) in alertEmails: { name: 'email-${i}', emailAddress: email, useCommonAlertSchema: true }
    ]
    logicAppReceivers: teams ? [teamsReceiver] : []
  }
}

// One datatable row per synced entity: an entity with no completed run in the window has no metric row at all.
var expectedEntities = '"${join(entities, '", "')}"'

// The only window sizes Azure accepts for a scheduled query rule, in minutes (the API's own error text). A window
// the parameters imply is rounded up to the next of these; beyond the largest, the deployment stops with a message.
var allowedWindowMinutes = [5, 10, 15, 30, 45, 60, 120, 180, 240, 300, 360, 1440, 2880]
var missedRunMinutes = missedRunIntervals * scheduleIntervalMinutes
var missedRunCandidates = [for w in allowedWindowMinutes: w >= missedRunMinutes ? w : 100000]
var missedRunWindow = min(missedRunCandidates) <= 2880 ? min(missedRunCandidates) : fail('missedRunIntervals × scheduleIntervalMinutes is ${missedRunMinutes} minutes; the missed-run alert\'s window can be at most 2880 (Azure accepts 5, 10, 15, 30, 45, 60, 120, 180, 240, 300, 360, 1440 and 2880)')
// Health readings (breaker, lag) are taken every fan-out tick: a window of two ticks, at least 15 minutes, holds one.
var readingMinutes = max(15, 2 * scheduleIntervalMinutes)
var readingCandidates = [for w in allowedWindowMinutes: w >= readingMinutes ? w : 100000]
var readingWindow = min(readingCandidates) <= 2880 ? min(readingCandidates) : fail('scheduleIntervalMinutes is ${scheduleIntervalMinutes}: the health readings\' alert window (two ticks) can be at most 2880 minutes')

var rules = [
  {
    name: 'failure-rate'
    display: 'billing sync: failure rate above ${failureRatePercent} %'
    severity: 2
    window: 'PT1H'
    query: format('customMetrics | where name == "sync_records" | extend outcome = tostring(customDimensions.outcome) | summarize bad = sumif(valueSum, outcome in ("failed", "invalid", "rejected")), total = sumif(valueSum, outcome != "deferred") | extend rate = iff(total == 0, 0.0, 100.0 * bad / total) | where rate > todouble("{0}")', failureRatePercent)
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'dlq-depth'
    display: 'billing sync: more than ${dlqOpenRowsThreshold} open DLQ rows'
    severity: 2
    window: 'PT15M'
    query: format('customMetrics | where name == "sync_dlq_depth" | summarize arg_max(timestamp, value) | where value > {0}', dlqOpenRowsThreshold)
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'poison'
    display: 'billing sync: messages reached the poison queue'
    severity: 1
    window: 'PT15M'
    query: 'customMetrics | where name == "sync_poison_messages" | summarize poisoned = sum(valueSum)'
    measure: 'poisoned'
    operator: 'GreaterThan'
    threshold: poisonMessagesThreshold
  }
  {
    name: 'no-successful-run'
    display: 'billing sync: no listing completed in ${missedRunIntervals} schedule intervals'
    severity: 1
    window: 'PT${missedRunWindow}M'
    query: 'datatable(entity: string) [${expectedEntities}] | join kind=leftouter (customMetrics | where name == "sync_runs" | where tostring(customDimensions.outcome) == "completed" | summarize completed = sum(valueSum) by entity = tostring(customDimensions.entity)) on entity | where coalesce(completed, 0.0) < 1'
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    // The seconds since the breaker left closed, through every half-open probe: the state alone flips between open
    // and half-open while probes fail, so "open for the whole window" would miss or flap.
    name: 'breaker-open'
    display: 'billing sync: a breaker open for ${breakerOpenMinutes} minutes'
    severity: 1
    window: 'PT${readingWindow}M'
    query: format('customMetrics | where name == "sync_breaker_open_seconds" | summarize arg_max(timestamp, value) by system = tostring(customDimensions.system) | where value >= {0}', breakerOpenMinutes * 60)
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'lag'
    display: 'billing sync: data older than ${lagMinutes} minutes'
    severity: 2
    window: 'PT${readingWindow}M'
    query: format('customMetrics | where name == "sync_lag_seconds" | summarize arg_max(timestamp, value) by entity = tostring(customDimensions.entity) | where value > {0}', lagMinutes * 60)
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'webhook-rejections'
    display: 'billing sync: more than ${webhookRejectionsThreshold} webhooks refused in 15 minutes'
    severity: 2
    window: 'PT15M'
    query: 'customMetrics | where name == "sync_webhooks" | where tostring(customDimensions.outcome) in ("bad_signature", "stale", "malformed") | summarize refused = sum(valueSum)'
    measure: 'refused'
    operator: 'GreaterThan'
    threshold: webhookRejectionsThreshold
  }
  {
    name: 'reconcile-drift'
    display: 'billing sync: the CRM drifted from billing (more than ${reconcileDriftRatio} of an entity\'s records differ)'
    severity: 2
    window: 'PT${readingWindow}M'
    query: format('customMetrics | where name == "sync_drift_ratio" | summarize arg_max(timestamp, value) by entity = tostring(customDimensions.entity) | where value > todouble("{0}")', reconcileDriftRatio)
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'reconcile-new-mismatches'
    display: 'billing sync: reconcile found more than ${reconcileNewMismatchesThreshold} new differences in a day'
    severity: 2
    window: 'PT1440M'
    query: 'customMetrics | where name == "sync_mismatches" | summarize found = sum(valueSum)'
    measure: 'found'
    operator: 'GreaterThan'
    threshold: reconcileNewMismatchesThreshold
  }
  {
    name: 'exceptions'
    display: 'billing sync: a burst of function exceptions'
    severity: 2
    window: 'PT15M'
    query: 'exceptions | summarize thrown = count()'
    measure: 'thrown'
    operator: 'GreaterThan'
    threshold: exceptionBurstThreshold
  }
]

resource alerts 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = [
  for rule in rules: {
    name: '${namePrefix}${rule.name}'
    location: location
    tags: tags
    properties: {
      displayName: rule.display
      description: '${rule.display}. ${runbook}.'
      severity: rule.severity
      enabled: true
      scopes: [applicationInsightsId]
      evaluationFrequency: 'PT5M'
      windowSize: rule.window
      criteria: {
        allOf: [
          {
            query: rule.query
            timeAggregation: empty(rule.measure) ? 'Count' : 'Total'
            metricMeasureColumn: empty(rule.measure) ? null : rule.measure
            operator: rule.operator
            threshold: rule.threshold
            failingPeriods: { numberOfEvaluationPeriods: 1, minFailingPeriodsToAlert: 1 }
          }
        ]
      }
      autoMitigate: true
      actions: { actionGroups: [actionGroup.id] }
    }
  }
]

// Secrets near expiry: Key Vault publishes SecretNearExpiry 30 days before a secret's expiry date (and
// SecretExpired at it) to Event Grid, which raises an Azure Monitor alert through the same action group. New
// versions are not watched (SecretNewVersionCreated would make the rotation itself an alert).
resource vaultEvents 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: '${namePrefix}kv-events'
  location: keyVaultLocation
  tags: tags
  properties: {
    source: keyVaultId
    topicType: 'Microsoft.KeyVault.vaults'
  }
}

resource secretExpiry 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: vaultEvents
  name: 'secret-expiry'
  properties: {
    eventDeliverySchema: 'CloudEventSchemaV1_0' // the only schema the Azure Monitor alert destination takes
    filter: {
      includedEventTypes: ['Microsoft.KeyVault.SecretNearExpiry', 'Microsoft.KeyVault.SecretExpired']
    }
    destination: {
      endpointType: 'MonitorAlert'
      properties: {
        severity: 'Sev2'
        description: 'billing sync: a Key Vault secret expires within 30 days or has expired (the Dataverse client secret, the billing API key or the webhook secret). ${runbook}, "Secret expiry".'
        actionGroups: [actionGroup.id]
      }
    }
    retryPolicy: { maxDeliveryAttempts: 10, eventTimeToLiveInMinutes: 1440 }
  }
}

output actionGroupId string = actionGroup.id
