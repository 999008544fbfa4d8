// "Billing sync health": records by outcome, failure rate, batch latency, DLQ depth, breaker states, lag, API
// requests, and reconcile: drift per entity and new differences by category.
param name string
param location string
param tags object
param applicationInsightsId string

var tiles = [
  {
    title: 'Records by outcome'
    query: 'customMetrics | where name == "sync_records" | summarize records = sum(valueSum) by outcome = tostring(customDimensions.outcome), bin(timestamp, 5m) | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'Failure rate (%)'
    query: 'customMetrics | where name == "sync_records" | extend outcome = tostring(customDimensions.outcome) | summarize bad = sumif(valueSum, outcome in ("failed", "invalid", "rejected")), total = sumif(valueSum, outcome != "deferred") by bin(timestamp, 15m) | extend rate = iff(total == 0, 0.0, 100.0 * bad / total) | project timestamp, rate | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'Batch latency (ms, mean and max)'
    query: 'customMetrics | where name == "sync_batch_duration_ms" | summarize mean = sum(valueSum) / sum(valueCount), longest = max(valueMax) by bin(timestamp, 5m) | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'Open DLQ rows'
    query: 'customMetrics | where name == "sync_dlq_depth" | summarize rows = max(value) by bin(timestamp, 5m) | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'Breaker state (0 closed, 1 half-open, 2 open)'
    query: 'customMetrics | where name == "sync_breaker_state" | summarize state = max(value) by system = tostring(customDimensions.system), bin(timestamp, 5m) | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'Lag since the last good run (s)'
    query: 'customMetrics | where name == "sync_lag_seconds" | summarize lag = max(value) by entity = tostring(customDimensions.entity), bin(timestamp, 5m) | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'API requests by status'
    query: 'customMetrics | where name == "sync_api_requests" | summarize requests = sum(valueSum) by system = tostring(customDimensions.system), status = tostring(customDimensions.status) | order by requests desc'
    visualization: 'table'
  }
  {
    title: 'Reconcile drift (records that differ / compared)'
    query: 'customMetrics | where name == "sync_drift_ratio" | summarize drift = max(value) by entity = tostring(customDimensions.entity), bin(timestamp, 1h) | render timechart'
    visualization: 'timechart'
  }
  {
    title: 'New differences reconcile found, by category'
    query: 'customMetrics | where name == "sync_mismatches" | summarize found = sum(valueSum) by category = tostring(customDimensions.category), entity = tostring(customDimensions.entity) | order by found desc'
    visualization: 'table'
  }
]

var content = {
  version: 'Notebook/1.0'
  items: [
    for (tile, i) in tiles: {
      type: 3
      name: 'tile-${i}'
      content: {
        version: 'KqlItem/1.0'
        title: tile.title
        query: tile.query
        size: 0
        timeContext: { durationMs: 86400000 }
        queryType: 0
        resourceType: 'microsoft.insights/components'
        visualization: tile.visualization
      }
    }
  ]
  isLocked: false
  fallbackResourceIds: [applicationInsightsId]
}

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: name
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'Billing sync health'
    category: 'workbook'
    sourceId: applicationInsightsId
    serializedData: string(content)
  }
}

output id string = workbook.id
