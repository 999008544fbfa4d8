// Key Vault for the three secrets. RBAC authorization (no access policies); the app's identity reads secrets
// (Key Vault Secrets User, see rbac.bicep) through Key Vault references in its app settings. The secrets are written
// only when seedSecrets is true (the first deployment): afterwards Key Vault is where they are rotated, and a
// provision leaves the versions it holds alone. References name no version, so the newest is always read.
param name string
param location string
param tags object
@description('Write the secrets below (first deployment, or on purpose); false leaves Key Vault\'s versions alone.')
param seedSecrets bool
@secure()
@description('The billing platform API key.')
param billingApiKey string
@secure()
@description('The billing webhook HMAC secret.')
param billingWebhookSecret string
@secure()
@description('Dataverse client secret(s), comma-separated; empty with managed identity.')
param dataverseClientSecret string
@description('Secrets expire one year after this (forces a yearly rotation; see docs/operations.md).')
param issuedAt string

var expires = dateTimeToEpoch(dateTimeAdd(issuedAt, 'P1Y'))

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: a Flex Consumption app without VNet integration reads Key Vault references over the public endpoint; RBAC gates every read
  // checkov:skip=CKV_AZURE_189: as above: public network access stays on unless the app is VNet-integrated
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { bypass: 'AzureServices', defaultAction: 'Allow' }
  }
}

resource billingKey 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (seedSecrets) {
  // checkov:skip=CKV_AZURE_41: checkov does not read the properties of a conditional resource; exp is set below
  // checkov:skip=CKV_AZURE_114: as above; contentType is set below
  parent: vault
  name: 'billing-api-key'
  properties: {
    value: billingApiKey
    contentType: 'text/plain'
    attributes: { enabled: true, exp: expires }
  }
}

resource webhookSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (seedSecrets) {
  // checkov:skip=CKV_AZURE_41: checkov does not read the properties of a conditional resource; exp is set below
  // checkov:skip=CKV_AZURE_114: as above; contentType is set below
  parent: vault
  name: 'billing-webhook-secret'
  properties: {
    value: billingWebhookSecret
    contentType: 'text/plain'
    attributes: { enabled: true, exp: expires }
  }
}

resource dataverseSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (seedSecrets && !empty(dataverseClientSecret)) {
  // checkov:skip=CKV_AZURE_41: checkov does not read the properties of a conditional resource; exp is set below
  // checkov:skip=CKV_AZURE_114: as above; contentType is set below
  parent: vault
  name: 'dataverse-client-secret'
  properties: {
    value: dataverseClientSecret
    contentType: 'text/plain'
    attributes: { enabled: true, exp: expires }
  }
}

output id string = vault.id
output name string = vault.name
// Versionless secret URIs, built from the vault's URI and the names above: no output reads a secure parameter.
output billingApiKeyUri string = '${vault.properties.vaultUri}secrets/billing-api-key'
output webhookSecretUri string = '${vault.properties.vaultUri}secrets/billing-webhook-secret'
output dataverseSecretUri string = '${vault.properties.vaultUri}secrets/dataverse-client-secret'
