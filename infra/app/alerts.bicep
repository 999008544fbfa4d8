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
@description('Minutes between fan-out ticks (SYNC_SCHEDULE).')
param scheduleIntervalMinutes int
@description('Alert when no listing completed within this many schedule intervals.')
param missedRunIntervals int
@description('Alert when a breaker stays open this many minutes.')
param breakerOpenMinutes int
@description('Alert when the app logs more exceptions than this within 15 minutes.')
param exceptionBurstThreshold int

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
  resourceId: teamsRelay.id
  callbackUrl: teamsTrigger.listCallbackUrl().value
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
    window: 'PT${missedRunIntervals * scheduleIntervalMinutes}M'
    query: 'datatable(entity: string) [${expectedEntities}] | join kind=leftouter (customMetrics | where name == "sync_runs" | where tostring(customDimensions.outcome) == "completed" | summarize completed = sum(valueSum) by entity = tostring(customDimensions.entity)) on entity | where coalesce(completed, 0.0) < 1'
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
  }
  {
    name: 'breaker-open'
    display: 'billing sync: a breaker open for ${breakerOpenMinutes} minutes'
    severity: 1
    window: 'PT${breakerOpenMinutes}M'
    query: 'customMetrics | where name == "sync_breaker_state" | summarize lowest = min(value) by system = tostring(customDimensions.system) | where lowest >= 2'
    measure: ''
    operator: 'GreaterThan'
    threshold: 0
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

output actionGroupId string = actionGroup.id
