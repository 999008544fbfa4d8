// The Functions app on Flex Consumption (FC1), Python 3.11, running as the user-assigned identity.
param planName string
param appName string
param location string
param tags object
param identityId string
param identityClientId string
param storageAccountName string
@description('Service endpoints of the storage account (https://NAME.blob.core.windows.net/ and so on).')
param blobServiceUri string
param queueServiceUri string
param tableServiceUri string
param deploymentContainerName string
param applicationInsightsConnectionString string
@description('Upper bound of instances; sizes the fleet against Dataverse service protection (README "Deploy").')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int
@allowed([512, 2048, 4096])
param instanceMemoryMB int
@description('App settings of the sync (see README "Configuration"); secrets arrive as Key Vault references.')
param syncSettings object

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: zone redundancy of Flex Consumption depends on the region; set zoneRedundant where it is offered
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { tier: 'FlexConsumption', name: 'FC1' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_17: the billing platform's webhook cannot present client certificates; it is HMAC-verified and every other route needs a function key
  // checkov:skip=CKV_AZURE_222: billing must reach the webhook; put the app behind a VNet and a gateway where the tenant requires it
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero; queue and timer work tolerates a cold start, so no always-ready instances are paid for
  // checkov:skip=CKV_AZURE_213: Flex Consumption has no platform health check; /api/health (function key) is what operators and alerts use
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'sync' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identityId}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: { name: 'python', version: '3.11' }
    }
  }

  resource settings 'config' = {
    // checkov:skip=CKV_AZURE_13: the app's routes use function keys and HMAC; App Service Authentication would block the billing webhook
    // checkov:skip=CKV_AZURE_63: this is the appsettings resource, not siteConfig; logs go to Application Insights
    // checkov:skip=CKV_AZURE_65: as above; not a site configuration
    // checkov:skip=CKV_AZURE_66: as above; not a site configuration
    // checkov:skip=CKV_AZURE_80: a Python app; no .NET Framework
    // checkov:skip=CKV_AZURE_88: Flex Consumption deploys from a blob container; it has no Azure Files content share
    // checkov:skip=CKV_AZURE_222: as on the site: billing must reach the webhook
    name: 'appsettings'
    properties: union(syncSettings, {
      // Identity-based host storage: one endpoint per service the host and the app use (blob: leases, timer
      // status, the package; queue: the work and poison queues; table: the sync's state).
      AzureWebJobsStorage__blobServiceUri: blobServiceUri
      AzureWebJobsStorage__queueServiceUri: queueServiceUri
      AzureWebJobsStorage__tableServiceUri: tableServiceUri
      AzureWebJobsStorage__credential: 'managedidentity'
      AzureWebJobsStorage__clientId: identityClientId
      APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsightsConnectionString
      APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
    })
  }
}

// No publishing with user names and passwords (FTP or the SCM site's basic auth): deployments go through Entra ID
// (azd, `func azure functionapp publish`, the deployment container with the app's identity).
resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: { allow: false }
}

resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: { allow: false }
}

output name string = app.name
output uri string = 'https://${app.properties.defaultHostName}'
